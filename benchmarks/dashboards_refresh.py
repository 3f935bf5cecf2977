"""What one 5 s refresh of each dashboard costs Prometheus.

Grafana refreshes every panel every 5 s; each refresh runs all of a dashboard's queries over the
default 24 h range. This runs them the way Grafana does (range queries, 24 h, 60 s step; instant
ones as instant queries; variables set to every value, $__range = 24h) and prints, per dashboard,
the queries' total time (sequential: the CPU Prometheus spends), the wall time with 6 in flight
(a browser's concurrency), the slowest query, and the share of the 5 s budget; plus a baseline of
the same number of trivial ``up`` queries, run in the same process.

By default it starts its own stack (fresh database, services, workers, exporters, a Prometheus
scraping every second with the generated rules) and runs the live test's workload first; with
``--prometheus-url`` it measures an existing Prometheus (e.g. `make run`'s) instead. A fresh
stack holds minutes of samples, not 24 h: its figures are a floor.

    .venv/bin/python benchmarks/dashboards_refresh.py [--rounds 5] [--prometheus-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dashboards.queries import iter_queries, load_json, substitute, variable_values  # noqa: E402

#: Grafana's variables for a 24 h range on a 5 s-scrape Prometheus
RANGE_VARS = {"__range": "24h", "__range_s": "86400", "__range_ms": "86400000",
              "__rate_interval": "2m", "__interval": "1m", "__auto": "1m"}
STEP = 60
BUDGET = 5.0


def timed_query(base: str, expr: str, instant: bool) -> float:
    now = time.time()
    if instant:
        params = {"query": expr, "time": f"{now:.3f}"}
        path = "/api/v1/query"
    else:
        params = {"query": expr, "start": f"{now - 86400:.3f}", "end": f"{now:.3f}", "step": str(STEP)}
        path = "/api/v1/query_range"
    t0 = time.perf_counter()
    with urllib.request.urlopen(base + path + "?" + urllib.parse.urlencode(params), timeout=60) as resp:
        body = json.loads(resp.read())
    elapsed = time.perf_counter() - t0
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return elapsed


def measure(base: str, rounds: int) -> None:
    dashboards = load_json(ROOT)
    print(f"Prometheus {base}; {rounds} rounds; range 24 h, step {STEP} s; budget {BUDGET:g} s per refresh")
    print(f"{'dashboard':18} {'queries':>7} {'sequential ms':>14} {'wall ms (6)':>12} {'slowest ms':>11} {'budget':>7}")
    totals = []
    for uid in sorted(dashboards):
        dash = dashboards[uid]
        values = {**variable_values(base, dash), **RANGE_VARS}
        for var in dash["templating"]["list"]:
            values.setdefault(var["name"], ".*")
        queries = [(substitute(q.expr, {**values, **RANGE_VARS}), q.instant)
                   for q in iter_queries(dash) if q.datasource == "prometheus"]
        if not queries:
            continue
        seq, wall, slowest = [], [], []
        for _ in range(rounds):
            times = [timed_query(base, e, i) for e, i in queries]
            seq.append(sum(times))
            slowest.append(max(times))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(6) as pool:
                list(pool.map(lambda q: timed_query(base, *q), queries))
            wall.append(time.perf_counter() - t0)
        s, w, m = statistics.median(seq), statistics.median(wall), statistics.median(slowest)
        totals.append((len(queries), s))
        print(f"{uid:18} {len(queries):7d} {s * 1000:14.1f} {w * 1000:12.1f} {m * 1000:11.1f} {w / BUDGET:7.1%}")
    n = max(q for q, _ in totals)
    base_times = [sum(timed_query(base, "up", False) for _ in range(n)) for _ in range(rounds)]
    b = statistics.median(base_times)
    print(f"baseline: {n} trivial `up` range queries, sequential {b * 1000:.1f} ms")
    worst = max(s for _, s in totals)
    print(f"most expensive dashboard: {worst * 1000:.1f} ms sequential = {worst / b:.1f}x the baseline, "
          f"{worst / BUDGET:.1%} of one 5 s refresh of one viewer")


def own_stack(rounds: int) -> None:
    import asyncpg

    from mailgenius.db import migrate
    from mailgenius.settings import load_settings
    from tests.dashboards import test_live as live
    from tests.stack import Stack

    name = f"mailgenius_bench_{uuid.uuid4().hex[:8]}"
    settings = load_settings()
    admin = settings.database_url.rsplit("/", 1)[0] + "/postgres"
    url = settings.database_url.rsplit("/", 1)[0] + "/" + name

    async def create():
        conn = await asyncpg.connect(admin)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        await migrate(url)

    async def drop():
        conn = await asyncpg.connect(admin)
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.close()

    asyncio.run(create())
    with tempfile.TemporaryDirectory(prefix="dash-bench-") as tmp:
        tmp = Path(tmp)
        secret = "whsec_" + __import__("base64").b64encode(uuid.uuid4().bytes).decode()
        s = settings.replace(database_url=url, redis_prefix=f"mgbench-{uuid.uuid4().hex[:6]}",
                             upload_dir=str(tmp / "uploads"), sink_dir=str(tmp / "sink"),
                             data_dir=str(tmp / "var"), resend_webhook_secret=secret)
        stack = Stack(s, tmp)
        try:
            stack.start_sink()
            for svc in ("sender", "importer", "exporter"):
                stack.start_service(svc, MAILGENIUS_EXPORTER_REFRESH_SECONDS="1")
            stack.start_worker("importer")
            stack.start_worker("sender")
            stack.start_exporters()
            jobs = {**stack.scrape_jobs(), "prometheus": stack.target("prometheus")}
            rules = sorted(str(p) for p in (ROOT / "prometheus" / "rules").glob("*.yml"))
            stack.start_prometheus(stack.prometheus_config(jobs=jobs, rule_files=rules, alertmanager=False))
            stack.wait_targets_up(60)
            key = live._create_key(url)
            tag = uuid.uuid4().hex[:8]
            live.run_import(stack, key, tag)
            cid, _ = live.run_campaign(stack, key, tag)
            live.engage(stack)
            live.provider_webhooks(stack, url, cid, secret)
            time.sleep(5)
            measure(stack.url("prometheus"), rounds)
        finally:
            stack.stop_all()
            asyncio.run(drop())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="refreshes measured per dashboard (median shown)")
    parser.add_argument("--prometheus-url", default=None,
                        help="measure this Prometheus instead of starting a stack (default: start one)")
    args = parser.parse_args()
    if args.prometheus_url:
        measure(args.prometheus_url.rstrip("/"), args.rounds)
    else:
        own_stack(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
