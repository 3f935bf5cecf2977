"""``mailgenius report daily|weekly --out FILE.html``: the operations guide's performance report,
from the one Prometheus client (:mod:`mailgenius.prom`) and the alert contract's thresholds and
selectors (:mod:`mailgenius.contract`)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

from mailgenius import contract
from mailgenius.prom import Prometheus, PrometheusError
from mailgenius.settings import Settings

from .base import OpsError
from .stack import ops_env, ops_settings

# -- report: the operations guide's daily / weekly performance report -------------------------

#: report kind -> (period in seconds, its PromQL duration, number of chart points wanted)
REPORT_PERIODS = {"daily": (86400, "24h", 240), "weekly": (7 * 86400, "7d", 336)}
def report_thresholds(c: contract.Contract | None = None) -> dict:
    """The thresholds the recommendations use: the alerts' own, from the contract."""
    t = (c or contract.get()).threshold
    return {"p95_seconds": t("api_latency_p95_seconds"), "error_ratio": t("http_error_ratio"),
            "delivery_ratio": t("email_delivery_ratio"), "bounce_ratio": t("email_bounce_ratio"),
            "queue_waiting": t("queue_waiting_messages"), "cpu_percent": round(100 * t("cpu_utilisation_ratio"), 6),
            "memory_percent": round(100 * t("memory_utilisation_ratio"), 6),
            "disk_percent": round(100 * t("disk_usage_critical_ratio"), 6),
            "cache_hit_ratio": t("postgres_cache_hit_ratio"), "db_connections_ratio": t("postgres_connections_ratio"),
            "worker_failure_ratio": t("worker_error_ratio")}


#: the guide's thresholds, used for the recommendations (read from alerting/rules.yml)
THRESHOLDS = report_thresholds()


@dataclass
class ChartSeries:
    label: str
    points: list[tuple[float, float]]


@dataclass
class Chart:
    title: str
    unit: str
    series: list[ChartSeries]
    queries: list[str]
    png: str = ""  # base64

    @property
    def points(self) -> int:
        return sum(len(s.points) for s in self.series)


def _series_label(metric: dict, label_keys: tuple[str, ...], default: str) -> str:
    parts = [metric[k] for k in label_keys if metric.get(k)]
    return " ".join(parts) or default


async def range_chart(prom: Prometheus, title: str, unit: str, queries: list[tuple[str, str, tuple[str, ...]]],
                      start: float, end: float, step: float, scale: float = 1.0) -> Chart:
    """queries: (expr, default series name, labels naming the series)."""
    series = []
    for expr, name, keys in queries:
        for r in await prom.query_range(expr, start, end, step):
            pts = []
            for t, v in r["values"]:
                fv = float(v)
                if not (math.isnan(fv) or math.isinf(fv)):
                    pts.append((float(t), fv * scale))
            if pts:
                series.append(ChartSeries(_series_label(r["metric"], keys, name), pts))
    return Chart(title, unit, series, [q[0] for q in queries])


def draw_chart(chart: Chart) -> str:
    """The chart as a base64 PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 2.9), dpi=100)
    try:
        if not chart.series:
            ax.text(0.5, 0.5, "no data in this period", ha="center", va="center", transform=ax.transAxes,
                    color="#666666")
            ax.set_xticks([])
            ax.set_yticks([])
        for s in chart.series[:12]:
            xs = [dt.datetime.fromtimestamp(t, dt.UTC) for t, _ in s.points]
            ys = [v for _, v in s.points]
            ax.plot(xs, ys, label=s.label, linewidth=1.6, marker="o" if len(xs) < 30 else None, markersize=3)
        if chart.series:
            locator = mdates.AutoDateLocator(tz=dt.UTC, maxticks=8)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=dt.UTC))
            ax.set_ylabel(chart.unit)
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper left", fontsize=7, ncol=min(4, len(chart.series[:12])), frameon=False)
        ax.set_title(chart.title, fontsize=10, loc="left")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        return base64.b64encode(buf.getvalue()).decode()
    finally:
        plt.close(fig)


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v * 100:.{digits}f} %"


def _num(v: float | None, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "n/a"
    return (f"{v:,.{digits}f}" + (f" {unit}" if unit else "")).replace(",", " ")


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.1f} ms"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def counted(selector: str, window: str, by: str = "") -> str:
    """PromQL for what a counter counted over ``window``, summed (``by`` labels).

    ``increase()`` suits series that existed when the window opened. A series born inside it (a
    label value seen for the first time, a process started during the period) would lose its
    first sample to ``increase()`` and gain an extrapolated guess instead, so for those the
    count is simply their last value (exact unless the process restarted within the window)."""
    grp = f" by ({by})" if by else ""
    old = f"sum{grp} (increase({selector}[{window}]) and {selector} offset {window})"
    born = f"sum{grp} (last_over_time({selector}[{window}]) unless {selector} offset {window})"
    return f"(({old} + {born}) or {old} or {born})"


async def collect_report(prom: Prometheus, kind: str, *, now: float | None = None, db_rows: dict | None = None) -> dict:
    """Query Prometheus for every section of the guide's report; return the template context."""
    period, R, npoints = REPORT_PERIODS[kind]
    end = now or time.time()
    start = end - period
    first = await prom.head_min_time()
    # an empty TSDB reports an "infinite" minimum time: then there is no data to zoom onto
    data_since = max(start, first) if first and first < end - 1 else start
    step = max((end - data_since) / npoints, 5.0)
    win = f"{max(300, int(step * 2))}s"  # rate window: at least 5 min, at least two steps

    # evaluate at end, end - step, ...: the newest point is always "now"
    chart_start = end - math.ceil((end - data_since) / step) * step

    async def rng(title, unit, queries, scale=1.0):
        return await range_chart(prom, title, unit, queries, chart_start, end, step, scale)

    c = contract.get()
    _FS = c.selector("filesystems")
    _API = c.selector("api_requests")
    # API traffic as the alerts and the summary count it: Prometheus' scrapes of /metrics left out
    _HTTP_DUR = f"mailgenius_http_request_duration_seconds_bucket{{{_API}}}"
    _HTTP_REQ = f"mailgenius_http_requests_total{{{_API}}}"
    _HTTP_5XX = f'mailgenius_http_requests_total{{{_API},{c.selector("http_5xx")}}}'
    s = {}
    # -- system performance
    total_req = await prom.scalar(counted(_HTTP_REQ, R))
    q = {p: await prom.scalar(f"histogram_quantile({p}, sum by (le) (increase({_HTTP_DUR}[{R}])))") for p in (0.5, 0.95, 0.99)}
    # figures "now" are the recorded series the alerts, the summary API and the page show too
    p95_now = await prom.scalar(c.series("api_latency_p95_all"))
    per_service = await prom.by(counted(_HTTP_REQ, R, "service"), "service")
    p95_service = await prom.by(f"histogram_quantile(0.95, sum by (service, le) (increase({_HTTP_DUR}[{R}])))", "service")
    s["performance"] = {
        "figures": [("requests", _num(total_req)), ("requests / min", _num(_ratio(total_req, (end - data_since) / 60), 1)),
                    ("latency p50", _ms(q[0.5])), ("latency p95", _ms(q[0.95])), ("latency p99", _ms(q[0.99])),
                    ("latency p95 now (5 min)", _ms(p95_now))],
        "table": {"headers": ["service", "requests", "p95"],
                  "rows": [[k, _num(v), _ms(p95_service.get(k))] for k, v in sorted(per_service.items())]},
        "charts": [
            await rng("API latency (all services)", "ms",
                [(f"histogram_quantile({p}, sum by (le) (rate({_HTTP_DUR}[{win}])))", f"p{int(p * 100)}", ()) for p in (0.5, 0.95, 0.99)],
                scale=1000),
            await rng("Requests per second by service", "req/s", [(f"sum by (service) (rate({_HTTP_REQ}[{win}]))", "requests", ("service",))]),
        ],
    }
    # -- errors and incidents
    err_total = await prom.scalar(counted(_HTTP_5XX, R)) or 0.0
    err_ratio = _ratio(err_total, total_req)
    fired = await prom.query(f'count by (alertname, severity) (max_over_time(ALERTS{{alertstate="firing"}}[{R}]))')
    alerts_fired = sorted((r["metric"].get("alertname", "?"), r["metric"].get("severity", "")) for r in fired)
    s["errors"] = {
        "figures": [("5xx responses", _num(err_total)), ("error rate", _pct(err_ratio, 2)),
                    ("alerts that fired", _num(len(alerts_fired)))],
        "table": {"headers": ["alert that fired", "severity"], "rows": [list(a) for a in alerts_fired]},
        "charts": [
            await rng("Error rate (5xx share of requests) by service", "%",
                [(f'(sum by (service) (rate({_HTTP_5XX}[{win}])) or sum by (service) (rate({_HTTP_REQ}[{win}])) * 0)'
                  f" / sum by (service) (rate({_HTTP_REQ}[{win}]))", "errors", ("service",))], scale=100),
            await rng("Firing alerts by severity", "alerts",
                [('count by (severity) (ALERTS{alertstate="firing"})', "firing", ("severity",))]),
        ],
        "incidents": (db_rows or {}).get("incidents"),
    }
    # -- email delivery
    # provider-aware (docs/metrics.md "Email KPIs"): delivered over the sends of providers with
    # delivery receipts only; bounces = refusals at submission + bounce receipts; opens and clicks
    # from our own tracking, per accepted email
    receipts = c.selector("delivery_reporting")
    sent = await prom.scalar(counted("mailgenius_emails_sent_total", R))
    sent_receipts = await prom.scalar(counted(f"mailgenius_emails_sent_total{{{receipts}}}", R))
    failures = await prom.scalar(counted("mailgenius_email_send_failures_total", R))
    refused = await prom.scalar(counted(f'mailgenius_email_send_failures_total{{{c.selector("refused")}}}', R)) or 0.0
    ev = await prom.by(counted("mailgenius_email_events_total", R, "event"), "event")
    delivered = (await prom.by(counted(f"mailgenius_email_events_total{{{receipts}}}", R, "event"), "event")).get("delivered")
    now_rates = {k: await prom.scalar(c.series(f"email_{k}_ratio_all")) for k in ("delivery", "bounce", "open", "click")}
    s["email"] = {
        "figures": [("sent", _num(sent)), ("send failures", _num(failures)),
                    ("delivery rate", _pct(_ratio(delivered, sent_receipts)) if sent_receipts else "not reported (no receipts)"),
                    ("bounce rate", _pct(_ratio((ev.get("bounced") or 0.0) + refused, (sent or 0.0) + refused))),
                    ("open rate", _pct(_ratio(ev.get("opened"), sent))), ("click rate", _pct(_ratio(ev.get("clicked"), sent))),
                    ("delivery rate, last hour", _pct(now_rates["delivery"], 2) if now_rates["delivery"] is not None
                     else "not reported (no sends with delivery receipts)"),
                    ("bounce rate, last hour", _pct(now_rates["bounce"], 2)),
                    ("open rate, last hour", _pct(now_rates["open"], 2)),
                    ("click rate, last hour", _pct(now_rates["click"], 2))],
        "table": {"headers": ["provider event", "count"], "rows": [[k, _num(v)] for k, v in sorted(ev.items())]},
        "charts": [
            await rng("Emails sent per second by provider", "emails/s",
                [(f"sum by (provider) (rate(mailgenius_emails_sent_total[{win}]))", "sent", ("provider",))]),
            await rng("Provider events per second", "events/s",
                [(f"sum by (event) (rate(mailgenius_email_events_total[{win}]))", "events", ("event",))]),
        ],
        "campaigns": (db_rows or {}).get("campaigns"),
    }
    # -- queues
    processed = await prom.scalar(counted("dramatiq_messages_total", R))
    job_errors = await prom.scalar(counted("dramatiq_message_errors_total", R))
    max_wait = await prom.by(f'max by (queue) (max_over_time(mailgenius_queue_messages{{state="waiting"}}[{R}]))', "queue")
    wait_now = await prom.by(f"max by (queue) ({c.series('queue_waiting')})", "queue")
    s["queues"] = {
        "figures": [("jobs processed", _num(processed)), ("job errors", _num(job_errors)),
                    ("job failure rate", _pct(_ratio(job_errors, processed), 2))],
        "table": {"headers": ["queue", "most waiting", "waiting now"],
                  "rows": [[k, _num(v), _num(wait_now.get(k))] for k, v in sorted(max_wait.items())]},
        "charts": [
            await rng("Waiting messages by queue", "messages",
                [('sum by (queue) (mailgenius_queue_messages{state="waiting"})', "waiting", ("queue",))]),
            await rng("Jobs processed per second by queue", "jobs/s",
                [(f"sum by (queue_name) (rate(dramatiq_messages_total[{win}]))", "processed", ("queue_name",))]),
        ],
    }
    # -- resource use
    cpu = await prom.scalar(f'100 * (1 - avg(rate(node_cpu_seconds_total{{mode="idle"}}[{win}])))')
    mem = await prom.scalar("100 * (1 - sum(node_memory_MemAvailable_bytes) / sum(node_memory_MemTotal_bytes))")
    # the fullest disk among the filesystems DiskSpaceLow watches (its recorded series)
    disk = await prom.scalar(f"100 * max({c.series('disk_usage')})")
    conns = await prom.scalar("sum(pg_stat_activity_count)")
    max_conns = await prom.scalar("max(pg_settings_max_connections)")
    hit = await prom.scalar(f"sum(rate(pg_stat_database_blks_hit[{win}])) / (sum(rate(pg_stat_database_blks_hit[{win}])) + sum(rate(pg_stat_database_blks_read[{win}])))")
    redis_mem = await prom.scalar("sum(redis_memory_used_bytes)")
    s["resources"] = {
        "figures": [("CPU", _num(cpu, 1, "%")), ("memory", _num(mem, 1, "%")), ("fullest disk", _num(disk, 1, "%")),
                    ("Postgres connections", f"{_num(conns)} / {_num(max_conns)}"), ("DB cache hit ratio", _pct(hit)),
                    ("Redis memory", _num(None if redis_mem is None else redis_mem / 2**20, 1, "MiB"))],
        "charts": [
            await rng("CPU, memory and disk use", "%", [
                (f'100 * (1 - avg(rate(node_cpu_seconds_total{{mode="idle"}}[{win}])))', "CPU", ()),
                ("100 * (1 - sum(node_memory_MemAvailable_bytes) / sum(node_memory_MemTotal_bytes))", "memory", ()),
                (f"100 * max(1 - node_filesystem_avail_bytes{{{_FS}}} / node_filesystem_size_bytes{{{_FS}}})", "fullest disk", ()),
            ]),
            await rng("Postgres connections and Redis memory", "count / MiB", [
                ("sum(pg_stat_activity_count)", "Postgres connections", ()),
                ("sum(redis_memory_used_bytes) / 1048576", "Redis MiB", ()),
            ]),
        ],
    }
    # -- trends: this period against the one before
    async def prev(expr):
        return await prom.scalar(expr, at=end - period)

    trend_rows = []
    for label, expr, fmt in (
        ("requests", counted(_HTTP_REQ, R), _num),
        ("latency p95", f"histogram_quantile(0.95, sum by (le) (increase({_HTTP_DUR}[{R}])))", _ms),
        ("error rate", f"({counted(_HTTP_5XX, R)} or {counted(_HTTP_REQ, R)} * 0) / {counted(_HTTP_REQ, R)}", lambda v: _pct(v, 2)),
        ("emails sent", counted("mailgenius_emails_sent_total", R), _num),
        ("jobs processed", counted("dramatiq_messages_total", R), _num),
        ("leads", "sum(mailgenius_leads)", _num),
    ):
        cur, before = await prom.scalar(expr), await prev(expr)
        change = "n/a" if cur is None or not before else f"{(cur - before) / before * 100:+.1f} %"
        trend_rows.append([label, fmt(cur), fmt(before), change])
    s["trends"] = {
        "table": {"headers": ["figure", "this period", "previous period", "change"], "rows": trend_rows},
        "charts": [await rng("Leads by status", "leads", [("sum by (status) (mailgenius_leads)", "leads", ("status",))])],
    }
    # -- recommendations from the guide's thresholds
    recs = []
    T = report_thresholds(c)
    if q[0.95] is not None and q[0.95] > T["p95_seconds"]:
        recs.append(f"API p95 latency is {_ms(q[0.95])} (> {contract.milliseconds(T['p95_seconds'])}): look for slow queries "
                    "(`mailgenius slow-queries`), blocking locks, and scale the API processes (runbook HighAPILatency).")
    if err_ratio is not None and err_ratio > T["error_ratio"]:
        recs.append(f"{_pct(err_ratio, 2)} of requests failed with 5xx (> {contract.percent(T['error_ratio'])}): read the services' error logs (runbook ErrorRateHigh).")
    dr = _ratio(delivered, sent_receipts)
    if dr is not None and dr < T["delivery_ratio"]:
        recs.append(f"Delivery rate {_pct(dr)} is under {contract.percent(T['delivery_ratio'])}: check bounces, SPF/DKIM/DMARC "
                    "(`POST /api/email/test-authentication`) and the provider status (runbook EmailDeliveryRateLow).")
    br = _ratio((ev.get("bounced") or 0.0) + refused, (sent or 0.0) + refused)
    if br is not None and br > T["bounce_ratio"]:
        recs.append(f"Bounce rate {_pct(br)} is over {contract.percent(T['bounce_ratio'])}: clean the lists that bounce (runbook BounceRateHigh).")
    if max_wait and max(max_wait.values()) > T["queue_waiting"]:
        recs.append(f"A queue held {max(max_wait.values()):.0f} waiting messages (> {contract.number(T['queue_waiting'])}): add workers "
                    "(`mailgenius worker ... --processes`, or more hosts) (runbook QueueDepthHigh).")
    jr = _ratio(job_errors, processed)
    if jr is not None and jr > T["worker_failure_ratio"]:
        recs.append(f"Job failure rate {_pct(jr, 2)} is over {contract.percent(T['worker_failure_ratio'])}: see the dead-letter queue and worker logs (runbook WorkerFailureRateHigh).")
    for val, key, what in ((cpu, "cpu_percent", "CPU"), (mem, "memory_percent", "memory"), (disk, "disk_percent", "disk")):
        if val is not None and val > T[key]:
            recs.append(f"{what} use is {val:.0f} % (> {contract.number(T[key])} %): plan capacity or move workers to other hosts.")
    if hit is not None and hit < T["cache_hit_ratio"]:
        recs.append(f"Postgres cache hit ratio {_pct(hit)} is under {contract.percent(T['cache_hit_ratio'])}: raise shared_buffers or add indexes; "
                    "run `mailgenius db-maintenance`.")
    if conns is not None and max_conns and conns / max_conns > T["db_connections_ratio"]:
        recs.append(f"{conns:.0f} of {max_conns:.0f} Postgres connections in use (> {contract.percent(T['db_connections_ratio'])}): "
                    "lower MAILGENIUS_DB_POOL_MAX per process or add PgBouncer.")
    if not recs:
        recs.append("Every figure is within the operations guide's thresholds: no action needed.")
    recs.append("Routine: `mailgenius backup` daily, `mailgenius cleanup-uploads` daily, `mailgenius db-maintenance` weekly.")
    s["recommendations"] = recs
    charts = [c for sec in s.values() if isinstance(sec, dict) for c in sec.get("charts", [])]
    for c in charts:
        c.png = draw_chart(c)
    return {
        "kind": kind, "period_label": "24 hours" if kind == "daily" else "7 days",
        "start": dt.datetime.fromtimestamp(start, dt.UTC), "end": dt.datetime.fromtimestamp(end, dt.UTC),
        "data_since": dt.datetime.fromtimestamp(data_since, dt.UTC), "prometheus_url": prom.url,
        "generated": dt.datetime.now(dt.UTC), "s": s, "charts": charts, "queries": sorted(set(prom.queries)),
    }


async def report_db_rows(settings: Settings, period_seconds: int) -> dict:
    """Campaign performance and incidents of the period (the guide's SQL), from Postgres."""
    import asyncpg

    try:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
    except Exception as exc:
        return {"error": f"Postgres unreachable: {exc}"}
    try:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=period_seconds)
        campaigns = await conn.fetch(
            """SELECT name, status, recipients, sent, delivered, bounced, opened, clicked, failed,
                      coalesce(started_at, created_at) AS at
               FROM campaigns WHERE coalesce(started_at, created_at) >= $1
               ORDER BY coalesce(started_at, created_at) DESC LIMIT 20""", since)
        incidents = await conn.fetch(
            """SELECT alertname, severity, service, status, started_at, resolved_at,
                      extract(epoch FROM resolved_at - started_at) AS seconds
               FROM incidents WHERE started_at >= $1 ORDER BY started_at DESC LIMIT 50""", since)
        return {"campaigns": [dict(r) for r in campaigns], "incidents": [dict(r) for r in incidents]}
    finally:
        await conn.close()


def render_report(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("console", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda a, b: "n/a" if not b else f"{(a or 0) / b * 100:.1f} %"
    return env.get_template("report.html.j2").render(**context)


def cmd_report(args) -> int:
    env = ops_env()
    settings = ops_settings(env)
    url = args.prometheus_url or settings.prometheus_url

    async def collect():
        db_rows = await report_db_rows(settings, REPORT_PERIODS[args.kind][0])
        async with Prometheus(url, timeout=10.0) as prom:
            try:
                return db_rows, await collect_report(prom, args.kind, db_rows=db_rows)
            except PrometheusError as exc:
                hint = "; is the stack running? (set MAILGENIUS_PROMETHEUS_URL)" if exc.unreachable else ""
                raise OpsError(f"{exc}{hint}") from None

    db_rows, context = asyncio.run(collect())
    context["db_error"] = db_rows.get("error")
    html = render_report(context)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html)
    empty = [c.title for c in context["charts"] if not c.series]
    print(f"wrote {out} ({len(html) / 1024:.0f} KiB, {len(context['charts'])} charts"
          + (f"; no data yet for: {', '.join(empty)}" if empty else "") + ")")
    return 0
