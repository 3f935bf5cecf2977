"""The operator API's route table (the OpenAPI document is generated from it). Handlers stay
thin: parse, call the domain function, answer; errors are mailgenius.errors.* (the kernel maps
them to ``{"error": {"code", "message"}}``)."""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from mailgenius import errors
from mailgenius import keys as k
from mailgenius import metrics as m
from mailgenius.queues import worker_count
from mailgenius.web import Route, json_response, read_json

from . import keys as ek
from .brokers import ACTIONS, TYPES, AdminError, queue_admin, queue_stats
from .collectors import incident_stats
from .incidents import (
    INCIDENTS_RESPONSE_SCHEMA,
    WEBHOOK_RESPONSE_SCHEMA,
    WEBHOOK_SCHEMA,
    check_webhook_token,
    list_incidents,
    parse_payload,
    record_alerts,
)
from .summary import RESPONSE_SCHEMA as SUMMARY_SCHEMA
from .summary import operator_summary

#: the most incidents one GET returns
MAX_INCIDENTS = 500


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# -- /api/monitoring/metrics ---------------------------------------------------------------------

async def monitoring_metrics(request: web.Request) -> web.Response:
    """The operator summary (API latency, rates, database, email, queues, leads, campaigns)."""
    ctx = request.app[ek.REFRESHER].ctx
    return json_response(await operator_summary(ctx, request.app[ek.HTTP]))


EMAIL_SCHEMA = {
    "type": "object",
    "required": ["generated_at", "prometheus", "email_stats", "campaign_metrics"],
    "properties": {k: SUMMARY_SCHEMA["properties"][k]
                   for k in ("generated_at", "prometheus", "email_stats", "campaign_metrics")},
}


async def email_metrics(request: web.Request) -> web.Response:
    """Email delivery and campaign figures only (the guide's 'check email metrics' step)."""
    ctx = request.app[ek.REFRESHER].ctx
    full = await operator_summary(ctx, request.app[ek.HTTP])
    return json_response({k: full[k] for k in EMAIL_SCHEMA["required"]})


# -- /api/queue/status ---------------------------------------------------------------------------

QUEUE_ROW = {
    "type": "object",
    "required": ["waiting", "delayed", "dead", "workers"],
    "properties": {
        "waiting": {"type": "integer"}, "delayed": {"type": "integer"},
        "dead": {"type": "integer", "description": "dead-lettered (failed) messages"},
        "oldest_age_seconds": {"type": "number", "nullable": True, "description": "null on RabbitMQ"},
        "workers": {"type": "integer", "description": "live worker processes (heartbeats)"},
    },
}
QUEUE_STATUS_SCHEMA = {
    "type": "object",
    "required": ["broker", "queues", "generated_at"],
    "properties": {
        "broker": {"type": "string", "enum": ["redis", "rabbitmq"]},
        "generated_at": {"type": "string", "format": "date-time"},
        "queues": {"type": "object", "properties": {q: QUEUE_ROW for q in m.QUEUES}},
    },
}


async def queue_status(request: web.Request) -> web.Response:
    """Depth, oldest message age and live workers of every queue, read from the broker now."""
    settings = request.app[k.SETTINGS]
    cfg = request.app[ek.CONFIG]
    redis = request.app[k.REDIS]
    queues = {}
    for q in m.QUEUES:
        st = await queue_stats(settings, redis, q)
        queues[q] = {"waiting": st.waiting, "delayed": st.delayed, "dead": st.dead,
                     "oldest_age_seconds": None if st.oldest_age_seconds is None
                     else round(st.oldest_age_seconds, 3),
                     "workers": await worker_count(redis, settings.redis_prefix, q,
                                                   stale_after=cfg.worker_stale_seconds)}
    return json_response({"broker": settings.broker_kind, "queues": queues,
                          "generated_at": dt.datetime.now(dt.UTC)})


# -- POST /api/queue/admin -----------------------------------------------------------------------

ADMIN_REQUEST = {
    "type": "object",
    "required": ["action", "queue", "type"],
    "properties": {
        "action": {"type": "string", "enum": list(ACTIONS),
                   "description": "clear = delete; retry = move failed (dead-lettered) messages back to waiting"},
        "queue": {"type": "string", "enum": list(m.QUEUES)},
        "type": {"type": "string", "enum": list(TYPES)},
        "dry_run": {"type": "boolean", "default": False, "description": "only count the selected messages"},
    },
}
ADMIN_RESPONSE = {
    "type": "object",
    "required": ["queue", "action", "type", "dry_run", "count"],
    "properties": {"queue": {"type": "string"}, "action": {"type": "string"}, "type": {"type": "string"},
                   "dry_run": {"type": "boolean"},
                   "count": {"type": "integer", "description": "messages selected (dry run) or affected"}},
}


async def queue_admin_handler(request: web.Request) -> web.Response:
    """Clear or retry the failed or waiting messages of one queue (admin scope)."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.ValidationError("the body must be a JSON object: {action, queue, type, dry_run}")
    missing = [f for f in ("action", "queue", "type") if not isinstance(body.get(f), str)]
    if missing:
        raise errors.ValidationError(f"missing or non-string field(s): {', '.join(missing)}")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise errors.ValidationError("dry_run must be true or false")
    try:
        result = await queue_admin(request.app[k.SETTINGS], request.app[k.REDIS], body["queue"],
                                   body["action"], body["type"], dry_run=dry_run, known_queues=m.QUEUES)
    except AdminError as exc:
        raise errors.ValidationError(str(exc)) from None
    return json_response(result.as_dict())


# -- POST /api/alerts/webhook --------------------------------------------------------------------

async def alerts_webhook(request: web.Request) -> web.Response:
    """Alertmanager's webhook (payload v4): firing alerts open incidents, resolved ones close them."""
    cfg = request.app[ek.CONFIG]
    check_webhook_token(request.headers.get("Authorization", ""), cfg.webhook_token)
    events = parse_payload(await read_json(request))
    counts = await record_alerts(request.app[k.DB], events, ignored=cfg.ignored_alerts)
    return json_response(counts)


# -- GET /api/incidents --------------------------------------------------------------------------

async def incidents_handler(request: web.Request) -> web.Response:
    """Recent incidents (newest first), open counts by severity, MTTR and MTBF."""
    q = request.query
    status = q.get("status") or None
    if status not in (None, "open", "resolved"):
        raise errors.ValidationError("status must be 'open' or 'resolved'")
    severity = q.get("severity") or None
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise errors.ValidationError("limit must be an integer") from None
    if not 1 <= limit <= MAX_INCIDENTS:
        raise errors.ValidationError(f"limit must be between 1 and {MAX_INCIDENTS}")
    pool = request.app[k.DB]
    rows = await list_incidents(pool, status=status, severity=severity, limit=limit)
    stats = await incident_stats(pool, request.app[ek.CONFIG].incident_window_days)
    return json_response({"incidents": rows, "open": stats.open_by_severity,
                          "mttr_seconds": stats.mttr_seconds, "mtbf_seconds": stats.mtbf_seconds})


ROUTES = [
    Route("GET", "/api/monitoring/metrics", monitoring_metrics, summary=monitoring_metrics.__doc__,
          responses={200: _json(SUMMARY_SCHEMA)}, tags=("monitoring",)),
    Route("GET", "/api/monitoring/emails/metrics", email_metrics, summary=email_metrics.__doc__,
          responses={200: _json(EMAIL_SCHEMA)}, tags=("monitoring",)),
    Route("GET", "/api/queue/status", queue_status, summary=queue_status.__doc__,
          responses={200: _json(QUEUE_STATUS_SCHEMA)}, tags=("queues",)),
    Route("POST", "/api/queue/admin", queue_admin_handler, scope="admin", summary=queue_admin_handler.__doc__,
          request_schema=ADMIN_REQUEST,
          responses={200: _json(ADMIN_RESPONSE), 422: _json({"type": "object"}, "unknown queue, action or type")},
          tags=("queues",)),
    Route("POST", "/api/alerts/webhook", alerts_webhook, scope=None, summary=alerts_webhook.__doc__,
          request_schema=WEBHOOK_SCHEMA,
          responses={200: _json(WEBHOOK_RESPONSE_SCHEMA), 422: _json({"type": "object"}, "malformed payload"),
                     401: _json({"type": "object"}, "missing or wrong webhook token"),
                     403: _json({"type": "object"}, "no webhook token configured on the exporter")},
          tags=("incidents",)),
    Route("GET", "/api/incidents", incidents_handler, summary=incidents_handler.__doc__,
          responses={200: _json(INCIDENTS_RESPONSE_SCHEMA), 422: _json({"type": "object"}, "bad query parameter")},
          tags=("incidents",)),
]
