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

from mailgenius import metrics as m

from .brokers import queue_stats
from .collectors import ACTIVE_CAMPAIGN_STATUSES, Context, LeadCounts, import_stats, incident_stats

log = logging.getLogger(__name__)

_HTTP = m.HTTP_REQUESTS
_HTTP_DUR = m.HTTP_REQUEST_DURATION
#: scrapes of /metrics are not API traffic: leave them out of latency and rates
_API = 'route!="/metrics"'
_LAT = f"sum by (le) (rate({_HTTP_DUR}_bucket{{{_API}}}[5m]))"


def _ratio(num: str, den: str) -> str:
    """Percent; a numerator with no series yet (no 5xx ever, no bounce yet) counts as 0, so the
    answer is 0 % whenever the denominator has data, and null only when it has none."""
    return f"100 * (({num}) or vector(0)) / ({den})"


def _ratio_by(num: str, den: str) -> str:
    return f"100 * ({num}) / ({den})"


_SENT_24H = f"sum(increase({m.EMAILS_SENT}[24h]))"


def _events_24h(event: str) -> str:
    return f'sum(increase({m.EMAIL_EVENTS}{{event="{event}"}}[24h]))'


#: name -> PromQL (scalar results)
SCALAR_QUERIES: dict[str, str] = {
    "api_p50": f"1000 * histogram_quantile(0.50, {_LAT})",
    "api_p95": f"1000 * histogram_quantile(0.95, {_LAT})",
    "api_p99": f"1000 * histogram_quantile(0.99, {_LAT})",
    "req_current": f"60 * sum(rate({_HTTP}{{{_API}}}[5m]))",
    "req_average": f"60 * sum(rate({_HTTP}{{{_API}}}[1h]))",
    "err_current": _ratio(f'sum(rate({_HTTP}{{{_API},status=~"5.."}}[5m]))', f"sum(rate({_HTTP}{{{_API}}}[5m]))"),
    "sent_per_hour": f"sum(increase({m.EMAILS_SENT}[1h]))",
    "delivery_rate": _ratio(_events_24h("delivered"), _SENT_24H),
    "bounce_rate": _ratio(_events_24h("bounced"), _SENT_24H),
    "open_rate": _ratio(_events_24h("opened"), _events_24h("delivered")),
    "click_rate": _ratio(_events_24h("clicked"), _events_24h("delivered")),
    "lead_growth": _ratio(f"sum({m.LEADS}) - sum({m.LEADS} offset 1d)", f"sum({m.LEADS} offset 1d)"),
}
#: name -> (PromQL, label naming the series)
VECTOR_QUERIES: dict[str, tuple[str, str]] = {
    "queue_active": ("sum by (queue_name) (dramatiq_messages_inprogress)", "queue_name"),
    "queue_rate": ("60 * sum by (queue_name) (rate(dramatiq_messages_total[5m]))", "queue_name"),
    "queue_completed": ("sum by (queue_name) (increase(dramatiq_messages_total[24h]))"
                        " - sum by (queue_name) (increase(dramatiq_message_errors_total[24h]))", "queue_name"),
    "queue_errors": ("sum by (queue_name) (increase(dramatiq_message_errors_total[24h]))", "queue_name"),
    "provider_delivery": (_ratio_by(f'sum by (provider) (increase({m.EMAIL_EVENTS}{{event="delivered"}}[24h]))',
                                 f"sum by (provider) (increase({m.EMAILS_SENT}[24h]))"), "provider"),
    "provider_latency": (f"sum by (provider) (rate({m.EMAIL_DELIVERY_LATENCY}_sum[1h]))"
                         f" / sum by (provider) (rate({m.EMAIL_DELIVERY_LATENCY}_count[1h]))", "provider"),
}

_NUM = {"type": "number", "nullable": True}
RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["generated_at", "prometheus", "api_latency", "request_rate", "error_rate",
                 "database", "email_stats", "queue_health", "lead_metrics", "campaign_metrics",
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
            "source": {"type": "string", "enum": ["prometheus", "postgres"]}}},
        "queue_health": {"type": "object", "description": "per queue: waiting, delayed, dead, "
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
        "incidents": {"type": "object", "properties": {
            "open": {"type": "object"}, "mttr_seconds": _NUM, "mtbf_seconds": _NUM}},
    },
}


class PrometheusUnreachable(Exception):
    pass


async def prom_query(session: aiohttp.ClientSession, base_url: str, expr: str, timeout: float) -> list[dict]:
    """One instant query; the result vector. Raises PrometheusUnreachable when Prometheus does
    not answer, ValueError when it rejects the query."""
    url = base_url.rstrip("/") + "/api/v1/query"
    try:
        async with session.get(url, params={"query": expr},
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise PrometheusUnreachable(f"{type(exc).__name__}: {exc}"[:300]) from None
    except ValueError:
        raise PrometheusUnreachable("Prometheus answered something that is not JSON") from None
    if body.get("status") != "success":
        raise ValueError(body.get("error", "query failed"))
    return body["data"]["result"]


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if x != x or x in (float("inf"), float("-inf")):  # NaN / Inf (e.g. 0/0): no data
        return None
    return round(x, 3)


async def prometheus_figures(session, base_url: str, timeout: float) -> tuple[dict, dict, str | None]:
    """(scalars, vectors, error): every query at once; on an unreachable Prometheus all None."""
    names = list(SCALAR_QUERIES) + list(VECTOR_QUERIES)
    exprs = list(SCALAR_QUERIES.values()) + [q for q, _ in VECTOR_QUERIES.values()]
    results = await asyncio.gather(*(prom_query(session, base_url, e, timeout) for e in exprs),
                                   return_exceptions=True)
    scalars: dict[str, float | None] = dict.fromkeys(SCALAR_QUERIES)
    vectors: dict[str, dict[str, float | None]] = {k: {} for k in VECTOR_QUERIES}
    error = None
    for name, res in zip(names, results, strict=True):
        if isinstance(res, PrometheusUnreachable):
            error = str(res)
            continue
        if isinstance(res, BaseException):
            log.warning("prometheus query failed", extra={"query": name, "error": str(res)})
            continue
        if name in SCALAR_QUERIES:
            scalars[name] = _num(res[0]["value"][1]) if res else None
        else:
            label = VECTOR_QUERIES[name][1]
            vectors[name] = {r["metric"].get(label, ""): _num(r["value"][1]) for r in res}
    return scalars, vectors, error


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
                            "threshold": 90.0, "unit": "percent"},
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
        "avg_open_rate": pct(int(t["opened"]), delivered),
        "avg_click_rate": pct(int(t["clicked"]), delivered),
        "avg_conversion_rate": None,  # no conversion events exist in this product
    }
    totals = {"delivery_rate": pct(delivered, sent), "bounce_rate": pct(int(t["bounced"]), sent),
              "open_rate": pct(int(t["opened"]), delivered), "click_rate": pct(int(t["clicked"]), delivered)}
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
        for q, row in queue.items():
            row["active"] = vectors["queue_active"].get(q)
            row["completed"] = vectors["queue_completed"].get(q)
            row["errors_24h"] = vectors["queue_errors"].get(q)
            row["processing_rate"] = vectors["queue_rate"].get(q)
            row["processing_rate_unit"] = "messages/min"
    email: dict[str, Any] = {k: scalars[k] for k in ("sent_per_hour", "delivery_rate", "bounce_rate",
                                                     "open_rate", "click_rate")}
    email["source"] = "prometheus"
    if isinstance(camp, tuple):
        campaigns, totals = camp
        if prom_error is not None or email["delivery_rate"] is None:
            # no Prometheus (or no sends in its window): the campaigns' exact counters instead
            for k, v in totals.items():
                if email.get(k) is None:
                    email[k] = v
            email["source"] = "postgres"
    else:
        campaigns = camp
    providers = set(vectors["provider_delivery"]) | set(vectors["provider_latency"])
    email["provider_performance"] = {
        p: {"delivery_rate": vectors["provider_delivery"].get(p),
            "avg_delivery_time": vectors["provider_latency"].get(p)} for p in sorted(providers)
    }
    return {
        "generated_at": dt.datetime.now(dt.UTC),
        "prometheus": {"reachable": prom_error is None, "url": settings.prometheus_url,
                       "error": prom_error},
        "api_latency": {"p50": scalars["api_p50"], "p95": scalars["api_p95"],
                        "p99": scalars["api_p99"], "unit": "ms"},
        "request_rate": {"current": scalars["req_current"], "average": scalars["req_average"],
                         "unit": "req/min"},
        "error_rate": {"current": scalars["err_current"], "threshold": 1.0, "unit": "percent"},
        "database": db,
        "email_stats": email,
        "queue_health": queue,
        "lead_metrics": lead,
        "campaign_metrics": campaigns,
        "incidents": inc,
    }
