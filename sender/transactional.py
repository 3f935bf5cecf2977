"""One transactional email (``POST /api/emails``), idempotent by the ``Idempotency-Key`` header:
the same key with the same body returns the first request's message; with another body, 409."""

from __future__ import annotations

import hashlib
import json

from mailgenius import addresses
from mailgenius.errors import Conflict, ValidationError

from . import templates
from .campaigns import check_from

MAX_KEY = 255


def parse(body) -> dict:
    if not isinstance(body, dict):
        raise ValidationError("expected a JSON object {\"to\", \"from_email\", \"subject\", \"html\", \"text\"}")
    unknown = set(body) - {"to", "from_email", "subject", "html", "text"}
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(sorted(unknown))}")
    try:  # exactly one bare address: no lists, comments or display names (one SMTP recipient)
        to = addresses.parse_address(body.get("to"))
    except addresses.AddressError as exc:
        raise ValidationError(f"to must be one email address: {exc}") from None
    subject = body.get("subject")
    if not isinstance(subject, str) or not subject.strip() or len(subject) > templates.MAX_SUBJECT_CHARS:
        raise ValidationError(f"subject is required (at most {templates.MAX_SUBJECT_CHARS} characters)")
    html, text = body.get("html", ""), body.get("text", "")
    if not isinstance(html, str) or not isinstance(text, str):
        raise ValidationError("html and text must be strings")
    if not html.strip() and not text.strip():
        raise ValidationError("html or text is required")
    if len(html.encode()) > templates.MAX_HTML_BYTES or len(text.encode()) > templates.MAX_TEXT_BYTES:
        raise ValidationError("html or text too large")
    return {"to": to.addr, "from_email": check_from(body.get("from_email")),
            "subject": " ".join(subject.split()), "html": html, "text": text}


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise ValidationError(f"Idempotency-Key must be 1-{MAX_KEY} printable characters")
    return key


async def create(pool, body, idempotency_key: str | None) -> tuple[dict, bool]:
    """(the message as JSON, created now?)."""
    e = parse(body)
    key = check_key(idempotency_key)
    digest = hashlib.sha256(json.dumps(e, sort_keys=True).encode()).hexdigest()
    stored_key = f"tx:{key}" if key else None
    async with pool.acquire() as conn, conn.transaction():
        # every spelling the mailbox may be stored under (normalised: the parser's lower-case form)
        lead = await conn.fetchrow(
            """SELECT id, status FROM leads WHERE lower(email) = ANY($1::text[])
               ORDER BY status IN ('bounced', 'complained') DESC LIMIT 1""",
            addresses.suppression_keys(e["to"]))
        if lead is not None and lead["status"] in ("bounced", "complained"):
            raise ValidationError(f"{e['to']} is suppressed ({lead['status']}): it is never mailed again",
                                  code="suppressed")
        mid = await conn.fetchval(
            """INSERT INTO messages (campaign_id, lead_id, email, status, idempotency_key)
               VALUES (NULL, $1, $2, 'pending', $3)
               ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id""",
            lead["id"] if lead else None, e["to"], stored_key)
        if mid is not None:
            await conn.execute(
                """INSERT INTO transactional_emails (message_id, from_email, subject, html, text, request_hash)
                   VALUES ($1, $2, $3, $4, $5, $6)""", mid, e["from_email"], e["subject"], e["html"], e["text"], digest)
            return {"id": mid, "status": "pending", "idempotent_replay": False}, True
    row = await pool.fetchrow(
        """SELECT m.id, m.status, t.request_hash FROM messages m JOIN transactional_emails t ON t.message_id = m.id
           WHERE m.idempotency_key = $1""", stored_key)
    if row is None:  # the first request is still committing: let the client retry
        raise Conflict("a request with this Idempotency-Key is in progress; retry shortly", code="idempotency_in_progress")
    if row["request_hash"] != digest:
        raise Conflict("this Idempotency-Key was used with a different request body", code="idempotency_key_reused")
    return {"id": row["id"], "status": row["status"], "idempotent_replay": True}, False


async def get(pool, mid: int) -> dict | None:
    row = await pool.fetchrow(
        """SELECT m.id, m.email AS to, m.status, m.delivery, m.provider, m.provider_message_id, m.attempts,
                  m.last_error, m.created_at, m.sent_at, m.delivered_at
           FROM messages m WHERE m.id = $1 AND m.campaign_id IS NULL""", mid)
    return dict(row) if row else None
