"""``mailgenius dashboards list|check``: the dashboards' queries, and a check of each against a
live Prometheus (every panel should return data once the stack has seen traffic)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_list(args) -> int:
    from dashboards.queries import iter_queries, load_json

    for uid, dash in load_json(Path(args.root)).items():
        for q in iter_queries(dash):
            print(f"{uid}\t{q.panel}\t{q.ref_id}\t{q.datasource}\t{q.expr}")
    return 0


def cmd_check(args) -> int:
    from dashboards.queries import check_prometheus, load_json
    from mailgenius.prom import PrometheusError
    from mailgenius.settings import load_settings

    url = args.prometheus_url or load_settings().prometheus_url
    dashboards = load_json(Path(args.root))
    if not dashboards:
        print(f"mailgenius: no dashboards under {Path(args.root).resolve()}/dashboards/json "
              "(run `mailgenius build`)", file=sys.stderr)
        return 2
    try:
        results = check_prometheus(url, dashboards)
    except PrometheusError as exc:
        print(f"mailgenius: cannot query Prometheus at {url}: {exc}", file=sys.stderr)
        return 1
    counts = {"ok": 0, "empty": 0, "ERROR": 0}
    for r in results:
        if not r.ok and "has no values" not in r.error:
            state = "ERROR"  # Prometheus rejected the query
        elif r.ok and r.series:
            state = "ok"
        else:
            state = "empty"  # valid, but no series (yet)
        counts[state] += 1
        if state != "ok" or args.verbose:
            print(f"{state:5}  {r.query.key}  ({r.series} series){'  ' + r.error if r.error else ''}")
    print(f"{len(results)} queries: {counts['ok']} with data, {counts['empty']} empty, {counts['ERROR']} rejected")
    bad = counts["ERROR"]
    return 1 if bad else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("dashboards", help="list the dashboards' queries or check them against Prometheus",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="dashboards_command", required=True)
    lp = sub.add_parser("list", help="print every query: dashboard, panel, refId, datasource, expression")
    lp.add_argument("--root", default=".", help="repository root holding dashboards/json")
    lp.set_defaults(func=cmd_list)
    cp = sub.add_parser("check", help="run every PromQL target (variables substituted) on a live Prometheus",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cp.add_argument("--prometheus-url", default=None,
                    help="Prometheus to query (default: MAILGENIUS_PROMETHEUS_URL); point it at another stack to audit it")
    cp.add_argument("--root", default=".", help="repository root holding dashboards/json")
    cp.add_argument("-v", "--verbose", action="store_true", help="also print the queries that returned data")
    cp.set_defaults(func=cmd_check)
