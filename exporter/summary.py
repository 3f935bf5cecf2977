"""The operator summary of the operations guide (``GET /api/monitoring/metrics``).

Rates and latencies come from Prometheus's HTTP API (instant queries over the services' own
series); the database section and the lead / campaign / queue / incident figures come from
Postgres, Redis and the broker directly, with cheap queries only. When Prometheus is unreachable
the answer still comes (HTTP 200) with ``"prometheus": {"reachable": false, "error": ...}`` and the
Prometheus-derived fields set to null; a section whose own source is down carries an ``"error"``
instead of its figures. It is never a 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from mailgenius import contract
from mailgenius import metrics as m
from mailgenius.prom import Prometheus, PrometheusError, finite

from .brokers import queue_stats
from .collectors import ACTIVE_CAMPAIGN_STATUSES, Context, LeadCounts, import_stats, incident_stats

log = logging.getLogger(__name__)

_HTTP = m.HTTP_REQUESTS
_HTTP_DUR = m.HTTP_REQUEST_DURATION


def _ratio(num: str, den: str) -> str:
    """Percent; a numerator with no series yet (no 5xx ever, no bounce yet) counts as 0, so the
    answer is 0 % whenever the denominator has data, and null only when it has none."""
    return f"100 * (({num}) or vector(0)) / ({den})"


def scalar_queries(c: contract.Contract | None = None) -> dict[str, str]:
    """name -> PromQL (scalar results). Figures other readers show too are the recorded series
    of the contract (alerting/rules.yml), so the summary, the page, the report, the dashboards
    and the alerts all show the same number."""
    c = c or contract.get()
    api = c.selector("api_requests")
    lat = f"sum by (le) (rate({_HTTP_DUR}_bucket{{{api}}}[5m]))"
    return {
        "api_p50": f"1000 * histogram_quantile(0.50, {lat})",
        "api_p95": f"1000 * {c.series('api_latency_p95_all')}",
        "api_p99": f"1000 * histogram_quantile(0.99, {lat})",
        "req_current": f"60 * sum(rate({_HTTP}{{{api}}}[5m]))",
        "req_average": f"60 * sum(rate({_HTTP}{{{api}}}[1h]))",
        "err_current": f"100 * {c.series('http_error_ratio_all')}",
        "sent_per_hour": f"sum(increase({m.EMAILS_SENT}[1h]))",
        "delivery_rate": f"100 * {c.series('email_delivery_ratio_all')}",
        "bounce_rate": f"100 * {c.series('email_bounce_ratio_all')}",
        "open_rate": f"100 * {c.series('email_open_ratio_all')}",
        "click_rate": f"100 * {c.series('email_click_ratio_all')}",
        # host resources: the recorded series of HighCPUUsage, HighMemoryUsage and DiskSpaceLow
        "cpu_usage": f"100 * max({c.series('cpu_utilisation')})",
        "memory_usage": f"100 * max({c.series('memory_utilisation')})",
        "disk_usage": f"100 * max({c.series('disk_usage')})",
        "lead_growth": _ratio(f"sum({m.LEADS}) - sum({m.LEADS} offset 1d)", f"sum({m.LEADS} offset 1d)"),
    }


def vector_queries(c: contract.Contract | None = None) -> dict[str, tuple[str, str]]:
    """name -> (PromQL, label naming the series)."""
    c = c or contract.get()
    q = m.QUEUE_LABEL
    processed = m.as_queue_label("increase(dramatiq_messages_total[24h])")
    errors = m.as_queue_label("increase(dramatiq_message_errors_total[24h])")
    return {
        "queue_active": (c.series("queue_active"), q),
        "queue_rate": (f"60 * {c.series('queue_processing_rate')}", q),
        "queue_completed": (f"sum by ({q}) ({processed}) - (sum by ({q}) ({errors}) or sum by ({q}) ({processed}) * 0)", q),
        "queue_errors": (f"sum by ({q}) ({errors})", q),
        "provider_sent": (f"sum by (provider) (increase({m.EMAILS_SENT}[1h]))", "provider"),
        "provider_delivery": (f"100 * {c.series('email_delivery_ratio')}", "provider"),
        "provider_bounce": (f"100 * {c.series('email_bounce_ratio')}", "provider"),
        "provider_complaint": (f"100 * {c.series('email_complaint_ratio')}", "provider"),
        "provider_open": (f"100 * {c.series('email_open_ratio')}", "provider"),
        "provider_click": (f"100 * {c.series('email_click_ratio')}", "provider"),
        "provider_latency": (f"sum by (provider) (rate({m.EMAIL_DELIVERY_LATENCY}_sum[1h]))"
                             f" / sum by (provider) (rate({m.EMAIL_DELIVERY_LATENCY}_count[1h]))", "provider"),
    }


#: the guide's names of the queues in ``queue_health`` (the project's queue names stay too)
GUIDE_QUEUE_KEYS = {m.QUEUE_EMAIL: "email_queue", m.QUEUE_IMPORT: "import_queue"}
#: provider figures only providers with delivery receipts can know
RECEIPT_FIGURES = ("delivery_rate", "complaint_rate", "avg_delivery_time")

_NUM = {"type": "number", "nullable": True}
RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["generated_at", "prometheus", "api_latency", "request_rate", "error_rate",
                 "database", "email_stats", "provider_performance", "queue_health", "lead_metrics", "campaign_metrics",
                 "incidents"],
    "properties": {
        "generated_at": {"type": "string", "format": "date-time"},
        "prometheus": {"type": "object", "required": ["reachable"],
                       "properties": {"reachable": {"type": "boolean"}, "url": {"type": "string"},
                                      "error": {"type": "string", "nullable": True}}},
        "api_latency": {"type": "object", "properties": {"p50": _NUM, "p95": _NUM, "p99": _NUM,
                                                         "unit": {"type": "string", "enum": ["ms"]}}},
        "request_rate": {"type": "object", "properties": {"current": _NUM, "average": _NUM,
                                                          "unit": {"type": "string", "enum": ["req/min"]}}},
        "error_rate": {"type": "object", "properties": {"current": _NUM, "threshold": _NUM,
                                                        "unit": {"type": "string", "enum": ["percent"]}}},
        "database": {"type": "object", "properties": {
            "query_performance": {"type": "object", "properties": {
                "avg_query_time": _NUM, "slow_queries": _NUM, "active_connections": _NUM,
                "max_connections": _NUM}},
            "cache_hit_ratio": {"type": "object", "properties": {"current": _NUM, "threshold": _NUM}},
            "error": {"type": "string"}}},
        "email_stats": {"type": "object", "properties": {
            "sent_per_hour": _NUM, "delivery_rate": _NUM, "bounce_rate": _NUM, "open_rate": _NUM,
            "click_rate": _NUM, "provider_performance": {"type": "object"},
            "source": {"type": "string", "enum": ["prometheus", "postgres"]},
            "window": {"type": "string", "description": "the period the rates cover (1h: the "
                       "recorded series the alerts use; 30d: the campaigns' counters)"},
            "delivery_rate_providers": {"type": "array", "items": {"type": "string"},
                                        "description": "providers with delivery receipts"},
            "not_reported": {"type": "object", "description": "figure -> why it is null (a "
                             "provider that cannot know it), never a 0"}}},
        "provider_performance": {"type": "object", "description": "per provider that sent in the "
                                 "last hour: sent_per_hour, delivery_rate, bounce_rate, complaint_rate, "
                                 "open_rate, click_rate (percent), avg_delivery_time (s), "
                                 "delivery_receipts; figures it cannot know are null and listed in "
                                 "not_reported"},
        "queue_health": {"type": "object", "description": "per queue (by its name, and as the "
                         "guide's email_queue / import_queue): waiting, delayed, dead, "
                         "oldest_age_seconds, workers, active, completed, failed, processing_rate; "
                         "or an 'error' string when the broker is unreachable",
                         "properties": {"error": {"type": "string"}},
                         "additionalProperties": {"type": "object"}},
        "lead_metrics": {"type": "object", "properties": {
            "total_leads": _NUM, "active_leads": _NUM, "by_status": {"type": "object"},
            "growth_rate": _NUM, "import_success_rate": _NUM, "validation_error_rate": _NUM}},
        "campaign_metrics": {"type": "object", "properties": {
            "active_campaigns": _NUM, "completed_campaigns": _NUM, "by_status": {"type": "object"},
            "auto_paused": {"type": "array", "description": "campaigns paused by a guard-rail: id, name, "
                            "pause_reason, auto_paused_at", "items": {"type": "object"}},
            "avg_open_rate": _NUM, "avg_click_rate": _NUM}},
        "resources": {"type": "object", "properties": {"cpu_usage": _NUM, "memory_usage": _NUM,
                                                       "disk_usage": _NUM, "unit": {"type": "string"}}},
        "incidents": {"type": "object", "properties": {
            "open": {"type": "object"}, "mttr_seconds": _NUM, "mtbf_seconds": _NUM}},
    },
}


def _num(v) -> float | None:
    x = finite(v)
    return None if x is None else round(x, 3)


async def prometheus_figures(session, base_url: str, timeout: float) -> tuple[dict, dict, str | None]:
    """(scalars, vectors, error): every query at once; on an unreachable Prometheus all None."""
    sq, vq = scalar_queries(), vector_queries()
    prom = Prometheus(base_url, session=session, timeout=timeout)
    names = list(sq) + list(vq)
    exprs = list(sq.values()) + [q for q, _ in vq.values()]
    results = await asyncio.gather(*(prom.query(e) for e in exprs), return_exceptions=True)
    scalars: dict[str, float | None] = dict.fromkeys(sq)
    vectors: dict[str, dict[str, float | None]] = {k: {} for k in vq}
    error = None
    for name, res in zip(names, results, strict=True):
        if isinstance(res, PrometheusError) and res.unreachable:
            error = str(res)
            continue
        if isinstance(res, BaseException):
            log.warning("prometheus query failed", extra={"query": name, "error": str(res)})
            continue
        if name in sq:
            scalars[name] = _num(res[0]["value"][1]) if res else None
        else:
            label = vq[name][1]
            vectors[name] = {r["metric"].get(label, ""): _num(r["value"][1]) for r in res}
    return scalars, vectors, error


def provider_performance(vectors: dict, receipts: frozenset[str]) -> dict[str, dict]:
    """Per provider that sent in the last hour: what it can know, and null (listed under
    ``not_reported``) for what it cannot: an SMTP relay gives no delivery receipts, so its
    delivery rate, complaint rate and delivery time are unknown, never 0."""
    providers = {p for p, v in vectors["provider_sent"].items() if v}
    out = {}
    for p in sorted(providers):
        row = {
            "sent_per_hour": vectors["provider_sent"].get(p),
            "delivery_rate": vectors["provider_delivery"].get(p),
            "bounce_rate": vectors["provider_bounce"].get(p),
            "complaint_rate": vectors["provider_complaint"].get(p),
            "open_rate": vectors["provider_open"].get(p),
            "click_rate": vectors["provider_click"].get(p),
            "avg_delivery_time": vectors["provider_latency"].get(p),
            "avg_delivery_time_unit": "s",
            "delivery_receipts": p in receipts,
        }
        if p not in receipts:
            for k in RECEIPT_FIGURES:
                row[k] = None
            row["not_reported"] = list(RECEIPT_FIGURES)
        out[p] = row
    return out


async def database_figures(pool, slow_seconds: float) -> dict:
    async with pool.acquire(timeout=2) as conn:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS connections,
                      current_setting('max_connections')::int AS max_connections,
                      (SELECT count(*) FROM pg_stat_activity
                        WHERE state = 'active' AND backend_type = 'client backend'
                          AND now() - query_start > make_interval(secs => $1)) AS slow,
                      d.blks_hit, d.blks_read, d.active_time, d.xact_commit + d.xact_rollback AS xacts
                 FROM pg_stat_database d WHERE d.datname = current_database()""",
            slow_seconds,
        )
        avg_ms, source = None, "pg_stat_database"
        has_pss = await conn.fetchval("SELECT to_regclass('pg_stat_statements') IS NOT NULL")
        if has_pss:
            try:
                avg_ms = await conn.fetchval(
                    "SELECT sum(total_exec_time) / nullif(sum(calls), 0) FROM pg_stat_statements")
                source = "pg_stat_statements"
            except Exception:  # extension listed but not preloaded
                avg_ms = None
        if avg_ms is None and row["xacts"]:
            avg_ms = float(row["active_time"] or 0) / row["xacts"]  # ms of SQL per transaction
    hit, read = row["blks_hit"] or 0, row["blks_read"] or 0
    return {
        "query_performance": {
            "avg_query_time": _num(avg_ms),
            "avg_query_time_source": source,
            "slow_queries": int(row["slow"]),
            "slow_query_threshold_seconds": slow_seconds,
            "active_connections": int(row["connections"]),
            "max_connections": int(row["max_connections"]),
            "unit": "ms",
        },
        "cache_hit_ratio": {"current": _num(100.0 * hit / (hit + read)) if hit + read else None,
                            "threshold": _num(100 * contract.get().threshold("postgres_cache_hit_ratio")),
                            "unit": "percent"},
    }


async def campaign_figures(pool) -> tuple[dict, dict]:
    """(campaign metrics, email totals of campaigns started in the last 30 days)."""
    by_status = {r["status"]: int(r["n"]) for r in await pool.fetch(
        "SELECT status, count(*) AS n FROM campaigns GROUP BY status")}
    t = await pool.fetchrow(
        """SELECT coalesce(sum(sent), 0) AS sent, coalesce(sum(delivered), 0) AS delivered,
                  coalesce(sum(bounced), 0) AS bounced, coalesce(sum(opened), 0) AS opened,
                  coalesce(sum(clicked), 0) AS clicked
             FROM campaigns WHERE created_at >= now() - interval '30 days'""")
    delivered = int(t["delivered"])
    sent = int(t["sent"])

    def pct(a, b):
        return _num(100.0 * a / b) if b else None

    # campaigns a guard-rail paused (sender/guardrails.py), with the reason, newest first
    paused = [{"id": r["id"], "name": r["name"], "pause_reason": r["pause_reason"],
               "auto_paused_at": r["auto_paused_at"].isoformat()} for r in await pool.fetch(
        """SELECT id, name, pause_reason, auto_paused_at FROM campaigns
           WHERE status = 'paused' AND pause_reason IS NOT NULL ORDER BY auto_paused_at DESC LIMIT 20""")]
    campaigns = {
        "auto_paused": paused,
        "active_campaigns": sum(by_status.get(s, 0) for s in ACTIVE_CAMPAIGN_STATUSES),
        "completed_campaigns": by_status.get("sent", 0),
        "by_status": by_status,
        "avg_open_rate": pct(int(t["opened"]), sent),
        "avg_click_rate": pct(int(t["clicked"]), sent),
        "avg_conversion_rate": None,  # no conversion events exist in this product
    }
    # as the recorded series define them: opens and clicks (our tracking) per accepted email; a
    # delivery rate only when delivery receipts were recorded (an SMTP relay sends none: unknown,
    # not 0 %)
    totals = {"delivery_rate": pct(delivered, sent) if delivered else None,
              "bounce_rate": pct(int(t["bounced"]), sent),
              "open_rate": pct(int(t["opened"]), sent), "click_rate": pct(int(t["clicked"]), sent)}
    return campaigns, totals


async def _section(coro, what: str):
    try:
        return await coro
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("operator summary section failed", extra={"section": what, "error": str(exc)})
        return {"error": f"{what} unavailable: {type(exc).__name__}: {exc}"[:300]}


async def operator_summary(ctx: Context, session: aiohttp.ClientSession) -> dict[str, Any]:
    import datetime as dt

    cfg, settings = ctx.config, ctx.settings
    pool, redis = ctx.get_pool(), ctx.get_redis()

    async def leads():
        counts = await LeadCounts().refresh(ctx)
        imp = await import_stats(pool, cfg.rate_window_hours)
        return {
            "total_leads": sum(counts.values()),
            "active_leads": counts.get("active", 0),
            "by_status": counts,
            "import_success_rate": _num(imp.success_ratio * 100) if imp.success_ratio is not None else None,
            "validation_error_rate": _num(imp.validation_error_ratio * 100)
            if imp.validation_error_ratio is not None else None,
        }

    async def queues():
        from mailgenius.queues import worker_count

        out = {}
        for q in m.QUEUES:
            st = await queue_stats(settings, redis, q)
            out[q] = {"waiting": st.waiting, "delayed": st.delayed, "dead": st.dead,
                      "failed": st.dead, "oldest_age_seconds": st.oldest_age_seconds,
                      "workers": await worker_count(redis, settings.redis_prefix, q,
                                                    stale_after=cfg.worker_stale_seconds)}
        return out

    async def incidents():
        s = await incident_stats(pool, cfg.incident_window_days)
        return {"open": s.open_by_severity, "mttr_seconds": _num(s.mttr_seconds),
                "mtbf_seconds": _num(s.mtbf_seconds)}

    (scalars, vectors, prom_error), db, lead, camp, queue, inc = await asyncio.gather(
        prometheus_figures(session, settings.prometheus_url, cfg.http_timeout),
        _section(database_figures(pool, cfg.slow_query_seconds), "database"),
        _section(leads(), "leads"),
        _section(campaign_figures(pool), "campaigns"),
        _section(queues(), "queues"),
        _section(incidents(), "incidents"),
    )
    if isinstance(lead, dict) and "error" not in lead:
        lead["growth_rate"] = scalars["lead_growth"]
    if isinstance(queue, dict) and "error" not in queue:
        for q in list(queue):
            row = queue[q]
            row["active"] = vectors["queue_active"].get(q)
            row["completed"] = vectors["queue_completed"].get(q)
            row["errors_24h"] = vectors["queue_errors"].get(q)
            row["processing_rate"] = vectors["queue_rate"].get(q)
            row["processing_rate_unit"] = "messages/min"
            row["queue"] = q
            # the operations guide's names of the same rows
            queue[GUIDE_QUEUE_KEYS[q]] = row
    email: dict[str, Any] = {k: scalars[k] for k in ("sent_per_hour", "delivery_rate", "bounce_rate",
                                                     "open_rate", "click_rate")}
    email["source"] = "prometheus"
    email["window"] = "1h"
    receipts = contract.get().receipt_providers
    providers = provider_performance(vectors, receipts)
    if isinstance(camp, tuple):
        campaigns, totals = camp
        if prom_error is not None or not email["sent_per_hour"]:
            # no Prometheus (or no sends in its window): the campaigns' exact counters instead
            for k, v in totals.items():
                if email.get(k) is None:
                    email[k] = v
            email["source"] = "postgres"
            email["window"] = "30d"
    else:
        campaigns = camp
    if email["delivery_rate"] is None:
        # say why it is null: no provider with delivery receipts sent anything in the window
        without = sorted(p for p in providers if p not in receipts) or ["smtp"]
        email["not_reported"] = {"delivery_rate": f"no delivery receipts from {', '.join(without)}; "
                                                  f"only {', '.join(sorted(receipts))} report deliveries"}
    email["delivery_rate_providers"] = sorted(receipts)
    email["provider_performance"] = providers
    return {
        "generated_at": dt.datetime.now(dt.UTC),
        "prometheus": {"reachable": prom_error is None, "url": settings.prometheus_url,
                       "error": prom_error},
        "api_latency": {"p50": scalars["api_p50"], "p95": scalars["api_p95"],
                        "p99": scalars["api_p99"], "unit": "ms"},
        "request_rate": {"current": scalars["req_current"], "average": scalars["req_average"],
                         "unit": "req/min"},
        "error_rate": {"current": scalars["err_current"],
                       "threshold": _num(100 * contract.get().threshold("http_error_ratio")), "unit": "percent"},
        "database": db,
        "email_stats": email,
        # where the operations guide puts it (also inside email_stats, where it was first)
        "provider_performance": providers,
        "queue_health": queue,
        "lead_metrics": lead,
        "campaign_metrics": campaigns,
        "incidents": inc,
        # beyond the guide: the busiest host's CPU and memory, the fullest watched filesystem
        "resources": {"cpu_usage": scalars["cpu_usage"], "memory_usage": scalars["memory_usage"],
                      "disk_usage": scalars["disk_usage"], "unit": "percent"},
    }
