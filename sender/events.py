"""Delivery and engagement events: provider webhooks (Resend, Svix-signed), bounce and complaint
reports (sender/bounces.py: the bounce mailbox's DSNs and ARF reports, the signed bounce webhook)
and our own open / click tracking. Each changes the ledger row, the campaign counters and, for
hard bounces and complaints, the lead (never mailed again), in one transaction; every report
source goes through :func:`record_event`."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass

import asyncpg

from mailgenius.errors import AppError

from . import guardrails
from .metrics import EVENTS, PROVIDERS, SenderMetrics

log = logging.getLogger(__name__)

#: Resend event type -> our event name (email_events_total's label); others are stored only
RESEND_TYPES = {
    "email.delivered": "delivered", "email.bounced": "bounced", "email.complained": "complained",
    "email.opened": "opened", "email.clicked": "clicked", "email.delivery_delayed": "delivery_delayed",
    "email.sent": None, "email.failed": None, "email.scheduled": None,
}
#: largest webhook body accepted
MAX_WEBHOOK_BYTES = 256 * 1024


class WebhookError(AppError):
    status = 400
    code = "invalid_webhook"


@dataclass
class Applied:
    event: str | None
    message_id: int | None = None
    provider: str = "resend"
    changed: bool = False
    latency: float | None = None
    duplicate: bool = False


def parse_timestamp(value) -> dt.datetime | None:
    """An ISO 8601 timestamp of a provider's payload (``Z`` or an offset; naive = UTC), or None
    when it is missing or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


async def apply_event(conn, msg, event: str, at: dt.datetime, *, hard_bounce: bool = True) -> tuple[bool, float | None]:
    """Apply one event to a (locked) message row; returns (ledger changed, delivery latency)."""
    mid, cid = msg["id"], msg["campaign_id"]
    inc: dict[str, int] = {}
    latency = None
    sets: list[str] = []
    lead_status = None
    if event == "delivered":
        if msg["delivered_at"] is None:
            sets += ["delivered_at = $2", "delivery = 'delivered'"]
            inc["delivered"] = 1
            if msg["sent_at"] is not None:
                latency = max(0.0, (at - msg["sent_at"]).total_seconds())
    elif event == "bounced":
        if hard_bounce and msg["delivery"] != "bounced":
            sets.append("delivery = 'bounced'")
            inc["bounced"] = 1
            lead_status = "bounced"
        elif not hard_bounce and msg["delivery"] not in ("bounced", "delivered"):
            sets.append("delivery = 'soft_bounced'")
    elif event == "complained":
        if msg["delivery"] != "complained":
            sets.append("delivery = 'complained'")
            inc["complained"] = 1
            lead_status = "complained"
    elif event == "opened":
        if msg["opened_at"] is None:
            sets.append("opened_at = $2")
            inc["opened"] = 1
    elif event == "clicked":
        if msg["clicked_at"] is None:
            sets.append("clicked_at = $2")
            inc["clicked"] = 1
            if msg["opened_at"] is None:  # a click proves an open (images may be blocked)
                sets.append("opened_at = $2")
                inc["opened"] = 1
    elif event == "delivery_delayed":
        if msg["delivered_at"] is None and msg["delivery"] is None:
            sets.append("delivery = 'delayed'")
    if not sets:
        return False, None
    await conn.execute(f"UPDATE messages SET {', '.join(sets)}, updated_at = now() WHERE id = $1"
                       + ("" if "$2" in " ".join(sets) else " AND $2::timestamptz IS NOT NULL"), mid, at)
    if inc and cid is not None:
        cols = ", ".join(f"{k} = {k} + {v}" for k, v in inc.items())
        await conn.execute(f"UPDATE campaigns SET {cols}, updated_at = now() WHERE id = $1", cid)
    if event == "bounced" and inc.get("bounced"):
        # a hard bounce reported after the send (a DSN, a provider's receipt) is a failed
        # recipient too: the campaign's failures report lists it (sender/failures.py)
        await conn.execute(
            """INSERT INTO message_refusals (message_id, campaign_id, reason, stage, failed_at)
               VALUES ($1, $2, 'bounced', 'report', $3) ON CONFLICT (message_id) DO NOTHING""", mid, cid, at)
    if lead_status and msg["lead_id"] is not None:
        await conn.execute(
            "UPDATE leads SET status = $2, updated_at = now() WHERE id = $1 AND status IN ('active', 'unsubscribed')",
            msg["lead_id"], lead_status)
    elif lead_status:
        await conn.execute(
            "UPDATE leads SET status = $2, updated_at = now() WHERE lower(email) = lower($1) AND status IN ('active', 'unsubscribed')",
            msg["email"], lead_status)
    return True, latency


#: events our own tracking endpoints count for every provider (the pixel and the click redirect)
TRACKED = ("opened", "clicked")

MSG_FIELDS = "id, campaign_id, lead_id, email, provider, sent_at, delivered_at, opened_at, clicked_at, delivery"


def parse_resend(body: bytes) -> tuple[str, dict, dt.datetime]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise WebhookError("the body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str) \
            or not isinstance(payload.get("data"), dict):
        raise WebhookError("expected {\"type\": ..., \"data\": {...}}")
    at = parse_timestamp(payload.get("created_at")) or parse_timestamp(payload["data"].get("created_at")) or dt.datetime.now(dt.UTC)
    return payload["type"], payload, at


@dataclass
class Report:
    """One delivery event from any source, before it is matched to our message.

    ``source`` is the ``email_events.provider`` column (resend, dsn, arf, webhook) and
    ``event_id`` the dedup key within it: a report seen twice is stored and applied once."""

    source: str
    event_id: str
    type: str
    event: str | None
    at: dt.datetime
    payload: str
    provider_message_id: str | None = None
    message_id: int | None = None
    hard: bool = True
    #: the address the report is about; when given it must be the message's (a report naming our
    #: Message-ID for another recipient is not applied)
    recipient: str | None = None


async def record_event(pool, metrics: SenderMetrics, report: Report) -> Applied:
    """Store ``report`` once (``email_events``), find its message, apply it to the message, the
    lead and the campaign counters in one transaction, check the campaign's guard-rails, and
    count it in the same metrics. The one path of Resend's webhooks, the bounce mailbox (DSN,
    ARF) and the signed bounce webhook."""
    event = report.event
    applied = Applied(event, provider=report.source)
    paused = None
    async with pool.acquire() as conn, conn.transaction():
        try:
            async with conn.transaction():  # a savepoint: a payload Postgres refuses is a 400
                eid = await conn.fetchval(
                    """INSERT INTO email_events (provider, event_id, type, provider_message_id, payload, occurred_at)
                       VALUES ($1, $2, $3, $4, $5::jsonb, $6)
                       ON CONFLICT (provider, event_id) DO NOTHING RETURNING id""",
                    report.source, report.event_id[:200], report.type[:100],
                    report.provider_message_id[:200] if report.provider_message_id else None, report.payload, report.at)
        except asyncpg.DataError as exc:
            raise WebhookError(f"the payload cannot be stored: {exc}") from None
        if eid is None:
            applied.duplicate = True
            return applied
        msg = None
        if report.provider_message_id:
            msg = await conn.fetchrow(
                f"""SELECT {MSG_FIELDS} FROM messages
                    WHERE id = (SELECT message_id FROM message_provider_ids WHERE provider_message_id = $1 LIMIT 1)
                    FOR UPDATE""", report.provider_message_id)
        if msg is None and report.message_id is not None and 0 < report.message_id < 2**63:
            msg = await conn.fetchrow(f"SELECT {MSG_FIELDS} FROM messages WHERE id = $1 FOR UPDATE", report.message_id)
        if msg is not None and report.recipient and msg["email"].lower() != report.recipient.strip().lower():
            log.warning("report names another recipient than its message; not applied",
                        extra={"message_id": msg["id"], "source": report.source})
            msg = None
        if msg is not None:
            applied.message_id = msg["id"]
            await conn.execute("UPDATE email_events SET message_id = $2 WHERE id = $1", eid, msg["id"])
            if event is not None:
                applied.changed, applied.latency = await apply_event(conn, msg, event, report.at,
                                                                     hard_bounce=report.hard)
                if applied.changed and event in ("bounced", "complained") and msg["campaign_id"] is not None:
                    paused = await guardrails.check(conn, msg["campaign_id"])
    if paused is not None:  # counted once committed
        metrics.auto_paused.labels(guardrails.reason_label(paused)).inc()
    # Resend's events count as they always have (every new event); the other sources count what
    # changed a message of ours, under the provider that sent it (the bounce and complaint
    # ratios divide by that provider's sends)
    if report.source == "resend":
        label = "resend"
    elif msg is not None and applied.changed:
        label = msg["provider"] if msg["provider"] in PROVIDERS else "smtp"
    else:
        label = None
    if label is not None:
        applied.provider = label
        # opens and clicks are counted by our own tracking, for every provider (record_tracking):
        # Resend's own open/click tracking, when enabled, would count the same open twice
        if event in EVENTS and not (report.source == "resend" and event in TRACKED):
            metrics.events.labels(label, event).inc()
        if applied.latency is not None:
            metrics.delivery_latency.labels(label).observe(applied.latency)
    return applied


async def record_resend(pool, metrics: SenderMetrics, svix_id: str, body: bytes) -> Applied:
    etype, payload, at = parse_resend(body)
    data = payload["data"]
    pid = data.get("email_id") if isinstance(data.get("email_id"), str) else None
    tag_id = None
    tags = data.get("tags")
    if isinstance(tags, dict):
        tag_id = tags.get("mg_message_id")
    elif isinstance(tags, list):
        for t in tags:
            if isinstance(t, dict) and t.get("name") == "mg_message_id":
                tag_id = t.get("value")
    bounce = data.get("bounce") if isinstance(data.get("bounce"), dict) else {}
    hard = str(bounce.get("type", "Permanent")).lower() not in ("transient", "undetermined", "soft")
    return await record_event(pool, metrics, Report(
        "resend", svix_id, etype, RESEND_TYPES.get(etype), at, body.decode("utf-8", "replace"),
        provider_message_id=pid, message_id=int(tag_id) if tag_id is not None and str(tag_id).isdigit() else None,
        hard=hard))


async def record_tracking(pool, metrics: SenderMetrics, msg_id: int, event: str) -> Applied | None:
    """An open or click seen by our own tracking endpoints; None when the message is unknown."""
    at = dt.datetime.now(dt.UTC)
    async with pool.acquire() as conn, conn.transaction():
        msg = await conn.fetchrow(f"SELECT {MSG_FIELDS} FROM messages WHERE id = $1 FOR UPDATE", msg_id)
        if msg is None:
            return None
        changed, _ = await apply_event(conn, msg, event, at)
    provider = msg["provider"] if msg["provider"] in ("resend", "smtp") else "smtp"
    if changed:
        # the first open (click) of a message: the open and click rates are unique opens (clicks)
        # over accepted emails, as the campaign's own counters count them
        metrics.events.labels(provider, event).inc()
    return Applied(event, msg_id, provider, changed)


async def unsubscribe(pool, msg_id: int) -> bool:
    """Mark the message's lead unsubscribed; False when the message is unknown."""
    async with pool.acquire() as conn, conn.transaction():
        msg = await conn.fetchrow("SELECT id, lead_id, email FROM messages WHERE id = $1", msg_id)
        if msg is None:
            return False
        if msg["lead_id"] is not None:
            await conn.execute("UPDATE leads SET status = 'unsubscribed', updated_at = now() "
                               "WHERE id = $1 AND status = 'active'", msg["lead_id"])
        else:
            await conn.execute("UPDATE leads SET status = 'unsubscribed', updated_at = now() "
                               "WHERE lower(email) = lower($1) AND status = 'active'", msg["email"])
    return True
