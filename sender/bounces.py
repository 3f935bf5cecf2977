"""Bounce and complaint intake for every provider: reports read from the bounce mailbox
(sender/mailbox.py, parsed by sender/dsn.py) and the signed bounce webhook for other ESPs.
Both end in :func:`sender.events.record_event`, the path of Resend's webhooks: one stored event
per report and recipient (``email_events``, unique per source and key, so a replay changes
nothing), the message, the lead, the campaign counters and ``mailgenius_email_events_total``.

The webhook (``POST /webhooks/bounces``) takes one JSON event::

    {"id": "evt_123",                 # the ESP's event id: the dedup key (required)
     "type": "bounce" | "complaint" | "delivered" | "delayed",
     "bounce_type": "hard" | "soft",  # bounce only; default hard
     "message_id": 42 | "<mg-42@news.example.com>",   # ours: the ledger id or the Message-ID we sent
     "recipient": "ana@example.org",  # required with a Message-ID; checked against the message
     "occurred_at": "2026-01-02T03:04:05Z", "status": "5.1.1", "diagnostic": "550 5.1.1 user unknown"}

signed with the shared secret ``MAILGENIUS_BOUNCE_WEBHOOK_SECRET``:
``X-MailGenius-Timestamp: <unix seconds>`` and
``X-MailGenius-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`` (several
``v1=`` values separated by commas are accepted, for rotating the secret). A timestamp more than
``WEBHOOK_TOLERANCE`` seconds away from now is refused (a captured request cannot be replayed
later; within the window the event id deduplicates it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time

from mailgenius.errors import Unauthorized

from . import dsn
from .events import Applied, Report, WebhookError, parse_timestamp, record_event
from .metrics import SenderMetrics

#: seconds a signed webhook stays valid (either side of now)
WEBHOOK_TOLERANCE = 300
TS_HEADER = "X-MailGenius-Timestamp"
SIG_HEADER = "X-MailGenius-Signature"
WEBHOOK_TYPES = {"bounce": "bounced", "complaint": "complained", "delivered": "delivered",
                 "delayed": "delivery_delayed"}


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def verify(secret: str, timestamp: str | None, signature: str | None, body: bytes, *, now: float | None = None) -> None:
    """Raise :class:`Unauthorized` unless the request is signed with ``secret`` and fresh."""
    if not timestamp or not signature:
        raise Unauthorized(f"missing {TS_HEADER} or {SIG_HEADER}", code="invalid_signature")
    try:
        ts = int(timestamp.strip())
    except ValueError:
        raise Unauthorized(f"{TS_HEADER} must be unix seconds", code="invalid_signature") from None
    now = time.time() if now is None else now
    if abs(now - ts) > WEBHOOK_TOLERANCE:
        raise Unauthorized(f"{TS_HEADER} is more than {WEBHOOK_TOLERANCE} s from now", code="invalid_signature")
    want = sign(secret, ts, body)
    given = [s.strip() for s in signature.split(",") if s.strip()]
    if not any(hmac.compare_digest(want, g) for g in given):
        raise Unauthorized("the signature does not match the body", code="invalid_signature")


def parse_webhook(body: bytes) -> Report:
    """The webhook body as a :class:`Report`; :class:`WebhookError` (400) names what is wrong."""
    try:
        p = json.loads(body)
    except ValueError:
        raise WebhookError("the body is not valid JSON") from None
    if not isinstance(p, dict):
        raise WebhookError("expected a JSON object")
    eid = p.get("id")
    if not isinstance(eid, str) or not 0 < len(eid) <= 200:
        raise WebhookError("id (the event's unique id, 1-200 characters) is required")
    etype = p.get("type")
    if etype not in WEBHOOK_TYPES:
        raise WebhookError(f"type must be one of {', '.join(WEBHOOK_TYPES)}")
    btype = p.get("bounce_type", "hard")
    if btype not in ("hard", "soft"):
        raise WebhookError("bounce_type must be hard or soft")
    rcpt = p.get("recipient")
    if rcpt is not None and (not isinstance(rcpt, str) or "@" not in rcpt or len(rcpt) > 320):
        raise WebhookError("recipient must be an email address")
    ref = p.get("message_id")
    if isinstance(ref, bool):
        ref = None
    if isinstance(ref, int):
        if not 0 < ref < 2**63:
            raise WebhookError("message_id is out of range")
        mid = ref
    elif isinstance(ref, str):
        m = dsn.MESSAGE_ID_RE.fullmatch(ref.strip())
        if m is None:
            raise WebhookError("message_id must be our ledger id or the Message-ID we sent (<mg-<id>@domain>)")
        if rcpt is None:
            raise WebhookError("recipient is required with a Message-ID")
        mid = int(m.group(1))
    else:
        raise WebhookError("message_id (our ledger id or the Message-ID we sent) is required")
    at = parse_timestamp(p.get("occurred_at")) if p.get("occurred_at") is not None else dt.datetime.now(dt.UTC)
    if at is None:
        raise WebhookError("occurred_at must be an ISO 8601 timestamp")
    return Report("webhook", eid, etype, WEBHOOK_TYPES[etype], at, body.decode("utf-8", "replace"),
                  message_id=mid, hard=btype == "hard", recipient=rcpt)


async def record_webhook(pool, metrics: SenderMetrics, body: bytes) -> Applied:
    try:
        report = parse_webhook(body)
    except WebhookError:
        metrics.bounce_reports.labels("webhook", "invalid").inc()
        raise
    applied = await record_event(pool, metrics, report)
    metrics.bounce_reports.labels("webhook", _outcome(applied)).inc()
    return applied


def _outcome(a: Applied) -> str:
    return "duplicate" if a.duplicate else ("applied" if a.message_id is not None else "unmatched")


def reports_of(parsed: dsn.ParsedReport) -> list[Report]:
    """One :class:`Report` per recipient finding of a mailbox report (dedup key: the report's
    key and the recipient)."""
    out = []
    for i, f in enumerate(parsed.findings):
        payload = {"kind": parsed.kind, "matched_by": parsed.matched_by, "recipient": f.recipient,
                   "action": f.action, "status": f.status, "diagnostic": f.diagnostic, **parsed.summary}
        etype = f"{parsed.kind}.{f.action or 'unknown'}"
        out.append(Report(
            parsed.kind, f"{parsed.key}|{f.recipient or i}", etype, f.event, parsed.at, json.dumps(payload),
            message_id=parsed.message_id, hard=f.hard,
            # a VERP match is signed; a Message-ID match must name the message's recipient
            recipient=None if parsed.matched_by == "verp" else (f.recipient or "\x00unknown")))
    return out


async def record_mailbox_message(pool, metrics: SenderMetrics, raw: bytes, secret: bytes | None) -> list[Applied]:
    """Parse one mailbox message and record its findings (each committed on return). Raises
    :class:`dsn.ReportError` when it is not a report (the caller leaves it in the mailbox)."""
    try:
        parsed = dsn.parse(raw, secret)
    except dsn.ReportError:
        metrics.bounce_reports.labels("dsn", "invalid").inc()
        raise
    out = []
    for report in reports_of(parsed):
        applied = await record_event(pool, metrics, report)
        metrics.bounce_reports.labels(parsed.kind, _outcome(applied)).inc()
        out.append(applied)
    return out
