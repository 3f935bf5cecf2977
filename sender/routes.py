"""The sender's route table and its thin handlers (parse, call the domain, answer)."""

from __future__ import annotations

import asyncio
import functools
import logging

from aiohttp import web
from svix.webhooks import Webhook, WebhookVerificationError

from mailgenius import errors, keys
from mailgenius.db import ReadOnlyPool
from mailgenius.metrics import QUEUE_EMAIL
from mailgenius.web import Route, json_response, read_json
from mailgenius.worker import enqueue

from . import bounces, campaigns, dnsauth, email_settings, events, failures, transactional
from . import keys as skeys

log = logging.getLogger(__name__)

#: actor names (sender/actors.py); the API enqueues by name without importing the actors
DISPATCH_ACTOR = "dispatch_campaign"
BATCH_ACTOR = "send_campaign_batch"
TRANSACTIONAL_ACTOR = "send_transactional_email"

PIXEL = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")
MAX_ID = 2**63 - 1


def _id(request: web.Request) -> int:
    value = int(request.match_info["id"])
    if value > MAX_ID:
        raise errors.NotFound("no such campaign")
    return value


async def _enqueue(request: web.Request, actor: str, *args) -> None:
    broker = request.app[skeys.BROKER]
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, functools.partial(enqueue, broker, QUEUE_EMAIL, actor, *args))
    except Exception as exc:
        log.error("enqueue failed", extra={"actor": actor, "error": f"{type(exc).__name__}: {exc}"})
        raise errors.Unavailable("the queue is unavailable; the request was recorded, retry to enqueue it") from None


async def _tracker(app: web.Application):
    """The tracking signer; loaded at start-up, or on first use when Postgres was down then."""
    holder: dict = app[skeys.TRACKING]
    if holder.get("tracker") is None:
        from .tracking import Tracker, load_secret

        secret = await load_secret(app[keys.DB], app[keys.SETTINGS].tracking_secret)
        holder["tracker"] = Tracker(secret, app[keys.SETTINGS].public_url)
    return holder["tracker"]


# -- campaigns ---------------------------------------------------------------------------------

async def create_campaign(request: web.Request) -> web.Response:
    out = await campaigns.create(request.app[keys.DB], await read_json(request))
    return json_response(out, status=201)


async def list_campaigns(request: web.Request) -> web.Response:
    return json_response({"campaigns": await campaigns.list_recent(request.app[keys.DB])})


async def get_campaign(request: web.Request) -> web.Response:
    # one row by primary key (the counts are counters on it); ReadOnlyPool skips the reset round trip
    return json_response(await campaigns.get(ReadOnlyPool(request.app[keys.DB]), _id(request)))


async def campaign_failures(request: web.Request) -> web.StreamResponse:
    """Failed recipients with reason and stage (sender/failures.py); CSV with ?format=csv."""
    cid, pool = _id(request), request.app[keys.DB]
    if failures.wants_csv(request):
        return await failures.csv_response(request, pool, cid)
    after, limit = failures.parse(request)
    return json_response(await failures.page(pool, cid, after, limit))


async def send_campaign(request: web.Request) -> web.Response:
    cid = _id(request)
    await campaigns.request_send(request.app[keys.DB], cid)
    await _enqueue(request, DISPATCH_ACTOR, cid)
    return json_response({"id": cid, "status": "queued"}, status=202)


async def pause_campaign(request: web.Request) -> web.Response:
    cid = _id(request)
    await campaigns.pause(request.app[keys.DB], cid)
    return json_response({"id": cid, "status": "paused"})


async def resume_campaign(request: web.Request) -> web.Response:
    cid = _id(request)
    _batches, finished = await campaigns.resume(request.app[keys.DB], cid)
    if finished:
        request.app[skeys.METRICS].campaigns_finished.labels(finished).inc()
        return json_response({"id": cid, "status": finished})
    await _enqueue(request, DISPATCH_ACTOR, cid)
    return json_response({"id": cid, "status": "sending"})


async def cancel_campaign(request: web.Request) -> web.Response:
    cid = _id(request)
    prev, n, more = await campaigns.cancel(request.app[keys.DB], cid)
    if prev != "draft":
        request.app[skeys.METRICS].campaigns_finished.labels("cancelled").inc()
    if more:  # a big campaign: the rest in the background (the sweeper finishes it if we die)
        tasks: set = request.app[skeys.TASKS]
        task = asyncio.create_task(campaigns.cancel_pending(request.app[keys.DB], cid))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return json_response({"id": cid, "status": "cancelled", "cancelled_recipients": n,
                          "cleanup": "in_progress" if more else "done"})


async def retry_failed(request: web.Request) -> web.Response:
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict) or set(body) - {"campaign_id"}:
        raise errors.ValidationError("expected {} or {\"campaign_id\": <id>}")
    cid = body.get("campaign_id")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, int) or not 0 < cid <= MAX_ID):
        raise errors.ValidationError("campaign_id must be a positive integer")
    per_campaign, tx = await campaigns.retry_failed(request.app[keys.DB], cid)
    for c in per_campaign:
        await _enqueue(request, DISPATCH_ACTOR, c)
    for mid in tx:
        await _enqueue(request, TRANSACTIONAL_ACTOR, mid)
    return json_response({"campaigns": sorted(per_campaign), "transactional": len(tx),
                          "batches": sum(len(b) for b in per_campaign.values())})


# -- transactional -----------------------------------------------------------------------------

async def send_email(request: web.Request) -> web.Response:
    out, _created = await transactional.create(request.app[keys.DB], await read_json(request),
                                               request.headers.get("Idempotency-Key"))
    if out["status"] == "pending":  # also on a replay whose first enqueue may have failed
        await _enqueue(request, TRANSACTIONAL_ACTOR, out["id"])
    return json_response(out, status=202)


async def get_email(request: web.Request) -> web.Response:
    out = await transactional.get(request.app[keys.DB], _id(request))
    if out is None:
        raise errors.NotFound("no such transactional email")
    return json_response(out)


# -- settings, DNS -----------------------------------------------------------------------------

async def get_email_settings(request: web.Request) -> web.Response:
    return json_response(await email_settings.load(request.app[keys.DB], request.app[keys.SETTINGS]))


async def put_email_settings(request: web.Request) -> web.Response:
    app = request.app
    current = await email_settings.load(app[keys.DB], app[keys.SETTINGS])
    new = email_settings.validate(await read_json(request), app[keys.SETTINGS], current)
    await email_settings.save(app[keys.DB], app[keys.REDIS], app[keys.SETTINGS], new)
    return json_response(new)


async def test_authentication(request: web.Request) -> web.Response:
    return json_response(await dnsauth.test_authentication(request.app[keys.SETTINGS], await read_json(request)))


# -- webhooks and tracking (no API key: signed instead) ------------------------------------------

async def resend_webhook(request: web.Request) -> web.Response:
    hook: Webhook | None = request.app[skeys.WEBHOOK]
    if hook is None:
        raise errors.AppError("no webhook secret is configured (MAILGENIUS_RESEND_WEBHOOK_SECRET)",
                              code="webhook_not_configured", status=503)
    if request.content_length is not None and request.content_length > events.MAX_WEBHOOK_BYTES:
        raise errors.PayloadTooLarge("webhook body too large")
    body = await request.read()
    if len(body) > events.MAX_WEBHOOK_BYTES:
        raise errors.PayloadTooLarge("webhook body too large")
    headers = {h: request.headers.get(h, "") for h in ("svix-id", "svix-timestamp", "svix-signature")}
    missing = [h for h, v in headers.items() if not v]
    if missing:
        raise errors.Unauthorized(f"missing Svix header(s): {', '.join(missing)}", code="invalid_signature")
    try:
        hook.verify(body, headers)
    except WebhookVerificationError as exc:
        raise errors.Unauthorized(f"webhook rejected: {exc}", code="invalid_signature") from None
    applied = await events.record_resend(request.app[keys.DB], request.app[skeys.METRICS], headers["svix-id"], body)
    return json_response({"ok": True, "duplicate": applied.duplicate, "event": applied.event,
                          "message_id": applied.message_id, "changed": applied.changed})


async def bounce_webhook(request: web.Request) -> web.Response:
    """Bounces and complaints from other ESPs (sender/bounces.py), HMAC-signed."""
    secret = request.app[keys.SETTINGS].bounce_webhook_secret
    if not secret:
        raise errors.AppError("no bounce webhook secret is configured (MAILGENIUS_BOUNCE_WEBHOOK_SECRET)",
                              code="webhook_not_configured", status=503)
    if request.content_length is not None and request.content_length > events.MAX_WEBHOOK_BYTES:
        raise errors.PayloadTooLarge("webhook body too large")
    body = await request.read()
    if len(body) > events.MAX_WEBHOOK_BYTES:
        raise errors.PayloadTooLarge("webhook body too large")
    bounces.verify(secret, request.headers.get(bounces.TS_HEADER), request.headers.get(bounces.SIG_HEADER), body)
    applied = await bounces.record_webhook(request.app[keys.DB], request.app[skeys.METRICS], body)
    return json_response({"ok": True, "duplicate": applied.duplicate, "event": applied.event,
                          "message_id": applied.message_id, "changed": applied.changed})


async def track_open(request: web.Request) -> web.Response:
    hit = (await _tracker(request.app)).verify("o", request.match_info["token"])
    if hit is None or await events.record_tracking(request.app[keys.DB], request.app[skeys.METRICS], hit[0], "opened") is None:
        raise errors.NotFound("unknown tracking link")
    return web.Response(body=PIXEL, content_type="image/gif",
                        headers={"Cache-Control": "no-store, max-age=0"})


async def track_click(request: web.Request) -> web.Response:
    hit = (await _tracker(request.app)).verify("c", request.match_info["token"])
    if hit is None:
        raise errors.NotFound("unknown tracking link")
    msg_id, link_id = hit
    url = await request.app[keys.DB].fetchval(
        """SELECT l.url FROM links l JOIN messages m ON m.campaign_id = l.campaign_id
           WHERE m.id = $1 AND l.id = $2""", msg_id, link_id)
    if url is None or not url.lower().startswith(("http://", "https://")):
        raise errors.NotFound("unknown tracking link")
    await events.record_tracking(request.app[keys.DB], request.app[skeys.METRICS], msg_id, "clicked")
    raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})


UNSUB_PAGE = """<!doctype html><meta charset="utf-8"><title>Unsubscribe</title>
<h1>Unsubscribe</h1><p>Stop receiving these emails?</p>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">Unsubscribe</button></form>"""
UNSUB_DONE = """<!doctype html><meta charset="utf-8"><title>Unsubscribed</title>
<h1>You are unsubscribed</h1><p>You will not receive these emails any more.</p>"""


async def unsubscribe(request: web.Request) -> web.Response:
    hit = (await _tracker(request.app)).verify("u", request.match_info["token"])
    if hit is None:
        raise errors.NotFound("unknown unsubscribe link")
    if request.method == "GET":  # RFC 8058: a GET (link scanners) never unsubscribes
        exists = await request.app[keys.DB].fetchval("SELECT 1 FROM messages WHERE id = $1", hit[0])
        if not exists:
            raise errors.NotFound("unknown unsubscribe link")
        return web.Response(text=UNSUB_PAGE, content_type="text/html")
    if not await events.unsubscribe(request.app[keys.DB], hit[0]):
        raise errors.NotFound("unknown unsubscribe link")
    return web.Response(text=UNSUB_DONE, content_type="text/html")


# -- schemas -----------------------------------------------------------------------------------

COUNTS_PROPS = {k: {"type": "integer"} for k in campaigns.COUNTS}
CAMPAIGN_SCHEMA = {"type": "object", "required": ["id", "status", *campaigns.COUNTS],
                   "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                  "status": {"type": "string", "enum": ["draft", "queued", "sending", "paused",
                                                                        "sent", "failed", "cancelled"]},
                                  "pause_reason": {"type": "string", "nullable": True},
                                  "auto_paused_at": {"type": "string", "format": "date-time", "nullable": True},
                                  **COUNTS_PROPS}}
CREATE_SCHEMA = {
    "type": "object", "required": ["name", "subject", "from_email"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200},
                   "subject": {"type": "string", "minLength": 1, "maxLength": 998},
                   "from_email": {"type": "string", "format": "email"},
                   "html": {"type": "string"}, "text": {"type": "string"},
                   "segment": {"type": "object", "additionalProperties": False,
                               "properties": {"tags": {"type": "array", "maxItems": 50,
                                                       "items": {"type": "string", "minLength": 1, "maxLength": 100}}}}},
}
EMAIL_SCHEMA = {
    "type": "object", "required": ["to", "from_email", "subject"], "additionalProperties": False,
    "properties": {"to": {"type": "string", "format": "email"}, "from_email": {"type": "string"},
                   "subject": {"type": "string", "minLength": 1, "maxLength": 998},
                   "html": {"type": "string"}, "text": {"type": "string"}},
}
SETTINGS_SCHEMA = {"type": "object", "additionalProperties": False,
                   "properties": {"provider": {"type": "string", "enum": ["resend", "smtp"]},
                                  "rate_limit": {"type": "number", "minimum": 0,
                                                 "maximum": email_settings.MAX_RATE_LIMIT}}}
DNS_SCHEMA = {"type": "object", "required": ["domain"], "additionalProperties": False,
              "properties": {"domain": {"type": "string", "maxLength": 253},
                             "dkim_selector": {"type": "string", "maxLength": 63}}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def routes() -> list[Route]:
    obj = {"type": "object"}
    return [
        Route("POST", "/api/campaigns", create_campaign, scope="send", summary="Create a campaign (templates checked)",
              request_schema=CREATE_SCHEMA, responses={201: _json(obj, "created"), 422: _json(obj, "invalid")},
              tags=("campaigns",)),
        Route("GET", "/api/campaigns", list_campaigns, summary="Recent campaigns", tags=("campaigns",),
              responses={200: _json(obj)}),
        Route("GET", r"/api/campaigns/{id:\d+}", get_campaign, summary="A campaign with its counts",
              responses={200: _json(CAMPAIGN_SCHEMA), 404: _json(obj, "unknown")}, tags=("campaigns",)),
        Route("GET", r"/api/campaigns/{id:\d+}/failures", campaign_failures, tags=("campaigns",),
              summary="Failed recipients with reason, SMTP stage and code (keyset: after, limit; format=csv)",
              responses={200: _json(obj), 404: _json(obj, "unknown"), 422: _json(obj, "bad paging")}),
        Route("GET", r"/api/campaigns/{id:\d+}/failures.csv", campaign_failures, tags=("campaigns",),
              summary="Failed recipients as CSV", responses={200: {"description": "CSV",
                                                                     "content": {"text/csv": {}}}}),
        Route("POST", r"/api/campaigns/{id:\d+}/send", send_campaign, scope="send", summary="Send a draft campaign",
              responses={202: _json(obj, "queued"), 409: _json(obj, "wrong state")}, tags=("campaigns",)),
        Route("POST", r"/api/campaigns/{id:\d+}/pause", pause_campaign, scope="send", summary="Pause sending",
              responses={200: _json(obj), 409: _json(obj, "wrong state")}, tags=("campaigns",)),
        Route("POST", r"/api/campaigns/{id:\d+}/resume", resume_campaign, scope="send", summary="Resume sending",
              responses={200: _json(obj), 409: _json(obj, "wrong state")}, tags=("campaigns",)),
        Route("POST", r"/api/campaigns/{id:\d+}/cancel", cancel_campaign, scope="send", summary="Cancel a campaign",
              responses={200: _json(obj), 409: _json(obj, "wrong state")}, tags=("campaigns",)),
        Route("POST", "/api/campaigns/retry-failed", retry_failed, scope="send",
              summary="Requeue failed recipients (of one campaign or all)",
              request_schema={"type": "object", "additionalProperties": False,
                              "properties": {"campaign_id": {"type": "integer", "minimum": 1}}},
              responses={200: _json(obj)}, tags=("campaigns",)),
        Route("POST", "/api/emails", send_email, scope="send", summary="Send one transactional email",
              request_schema=EMAIL_SCHEMA, responses={202: _json(obj, "accepted"), 409: _json(obj, "key reused")},
              tags=("emails",)),
        Route("GET", r"/api/emails/{id:\d+}", get_email, summary="A transactional email's status",
              responses={200: _json(obj), 404: _json(obj, "unknown")}, tags=("emails",)),
        Route("GET", "/api/settings/email", get_email_settings, summary="Email provider and rate limit",
              responses={200: _json(SETTINGS_SCHEMA)}, tags=("settings",)),
        Route("PUT", "/api/settings/email", put_email_settings, scope="admin",
              summary="Change provider / rate limit (applies within seconds, no restart)",
              request_schema=SETTINGS_SCHEMA, responses={200: _json(SETTINGS_SCHEMA)}, tags=("settings",)),
        Route("POST", "/api/email/test-authentication", test_authentication, scope="send",
              summary="SPF, DKIM and DMARC findings from DNS", request_schema=DNS_SCHEMA,
              responses={200: _json(obj)}, tags=("settings",)),
        Route("POST", "/webhooks/resend", resend_webhook, scope=None, summary="Resend events (Svix-signed)",
              responses={200: _json(obj), 401: _json(obj, "bad signature"), 400: _json(obj, "malformed")},
              tags=("webhooks",)),
        Route("POST", "/webhooks/bounces", bounce_webhook, scope=None,
              summary="Bounces and complaints from other ESPs (HMAC-SHA256 signed, see sender/README.md)",
              responses={200: _json(obj), 401: _json(obj, "bad signature"), 400: _json(obj, "malformed")},
              tags=("webhooks",)),
        Route("GET", "/t/o/{token}", track_open, scope=None, summary="Open-tracking pixel",
              responses={200: {"description": "1x1 GIF", "content": {"image/gif": {}}}}, tags=("tracking",)),
        Route("GET", "/t/c/{token}", track_click, scope=None, summary="Click redirect (campaign links only)",
              responses={302: {"description": "redirect"}, 404: _json(obj, "unknown")}, tags=("tracking",)),
        Route("GET", "/u/{token}", unsubscribe, scope=None, summary="Unsubscribe page",
              responses={200: {"description": "page", "content": {"text/html": {}}}}, tags=("tracking",)),
        Route("POST", "/u/{token}", unsubscribe, scope=None, summary="One-click unsubscribe (RFC 8058)",
              request_content="application/x-www-form-urlencoded",
              responses={200: {"description": "done", "content": {"text/html": {}}}}, tags=("tracking",)),
    ]
