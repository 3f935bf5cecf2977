"""Campaigns: creation (templates checked here), the recipient ledger, and the state machine
draft -> queued -> sending -> sent | failed, with paused and cancelled.

Counters on the campaigns row (recipients, queued, sent, failed, ...) change only in the same
transaction as the ledger rows they count, so reading a campaign never scans ``messages``.
``queued`` is the number of recipients still pending or being sent.
"""

from __future__ import annotations

import json
import logging
import re

import asyncpg

from mailgenius.db import LONG_COMMAND_TIMEOUT
from mailgenius.errors import Conflict, NotFound, ValidationError

from . import guardrails, templates
from .config import BATCH_SIZE

log = logging.getLogger(__name__)

COUNTS = ("recipients", "queued", "sent", "delivered", "bounced", "complained", "opened", "clicked", "failed")
#: name <addr> or addr; no CR/LF (header injection)
EMAIL_RE = re.compile(r"^[^@\s<>\"\r\n]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
FROM_RE = re.compile(r"^(?:[^<>\r\n]{0,100}<([^<>\r\n]+)>|([^<>\r\n]+))$")
MAX_TAGS = 50
#: rows cancelled per transaction when a big campaign is cancelled
CANCEL_CHUNK = 50_000

CAMPAIGN_FIELDS = ("id, name, subject, from_email, segment, status, " + ", ".join(COUNTS)
                   + ", pause_reason, auto_paused_at, created_at, started_at, finished_at, updated_at")


def valid_email(addr: str) -> bool:
    return isinstance(addr, str) and len(addr) <= 320 and EMAIL_RE.match(addr) is not None


def check_from(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("from_email is required")
    m = FROM_RE.match(value.strip())
    addr = (m.group(1) or m.group(2)).strip() if m else ""
    if not valid_email(addr):
        raise ValidationError("from_email must be an address like news@example.com or 'Name <news@example.com>'")
    return value.strip()


def _str(body: dict, key: str, *, required: bool, max_len: int, default: str = "") -> str:
    v = body.get(key, None)
    if v is None:
        if required:
            raise ValidationError(f"{key} is required")
        return default
    if not isinstance(v, str):
        raise ValidationError(f"{key} must be a string")
    if len(v) > max_len:
        raise ValidationError(f"{key} is longer than {max_len} characters")
    return v


def parse_segment(seg) -> dict:
    if seg is None:
        return {"tags": []}
    if not isinstance(seg, dict):
        raise ValidationError("segment must be an object like {\"tags\": [\"newsletter\"]}")
    unknown = set(seg) - {"tags"}
    if unknown:
        raise ValidationError(f"unknown segment field(s): {', '.join(sorted(unknown))}")
    tags = seg.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= 100 for t in tags):
        raise ValidationError("segment.tags must be a list of non-empty strings")
    if len(tags) > MAX_TAGS:
        raise ValidationError(f"segment.tags has more than {MAX_TAGS} tags")
    return {"tags": sorted(set(tags))}


def row_to_json(r) -> dict:
    d = dict(r)
    seg = d.get("segment")
    if isinstance(seg, str):
        d["segment"] = json.loads(seg)
    return d


async def create(pool, body) -> dict:
    if not isinstance(body, dict):
        raise ValidationError("expected a JSON object")
    allowed = {"name", "subject", "from_email", "html", "text", "segment"}
    unknown = set(body) - allowed
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(sorted(unknown))}")
    name = _str(body, "name", required=True, max_len=200).strip()
    if not name:
        raise ValidationError("name must not be empty")
    subject = _str(body, "subject", required=True, max_len=templates.MAX_SUBJECT_CHARS)
    from_email = check_from(body.get("from_email"))
    html = _str(body, "html", required=False, max_len=templates.MAX_HTML_BYTES)
    text = _str(body, "text", required=False, max_len=templates.MAX_TEXT_BYTES)
    segment = parse_segment(body.get("segment"))
    links = templates.validate_campaign(subject, html, text)
    async with pool.acquire() as conn, conn.transaction():
        cid = await conn.fetchval(
            """INSERT INTO campaigns (name, subject, from_email, html, text, segment)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb) RETURNING id""",
            name, subject, from_email, html, text, json.dumps(segment))
        if links:
            await conn.execute(
                "INSERT INTO links (campaign_id, url) SELECT $1, u FROM unnest($2::text[]) u ON CONFLICT DO NOTHING",
                cid, links)
    return {"id": cid, "status": "draft", "links": len(links)}


async def get(pool, cid: int) -> dict:
    r = await pool.fetchrow(f"SELECT {CAMPAIGN_FIELDS} FROM campaigns WHERE id = $1", cid)
    if r is None:
        raise NotFound(f"no campaign {cid}")
    return row_to_json(r)


async def list_recent(pool, limit: int = 50) -> list[dict]:
    rows = await pool.fetch(f"SELECT {CAMPAIGN_FIELDS} FROM campaigns ORDER BY id DESC LIMIT $1", limit)
    return [row_to_json(r) for r in rows]


async def _transition(pool, cid: int, allowed: tuple[str, ...], new: str, extra: str = "") -> str:
    """Move the campaign to ``new`` from one of ``allowed``; returns the previous status."""
    async with pool.acquire() as conn, conn.transaction():
        cur = await conn.fetchval("SELECT status FROM campaigns WHERE id = $1 FOR UPDATE", cid)
        if cur is None:
            raise NotFound(f"no campaign {cid}")
        if cur not in allowed:
            raise Conflict(f"campaign {cid} is {cur}; this needs it to be {' or '.join(allowed)}",
                           code="invalid_state")
        await conn.execute(f"UPDATE campaigns SET status = $2, updated_at = now(){extra} WHERE id = $1", cid, new)
        return cur


async def request_send(pool, cid: int) -> None:
    await _transition(pool, cid, ("draft",), "queued")


async def write_ledger(pool, cid: int) -> int | None:
    """One messages row per recipient of the segment, numbered into batches of BATCH_SIZE, with
    the counters, in one transaction. None when the ledger was already written (redelivery)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT status, segment FROM campaigns WHERE id = $1 FOR UPDATE", cid)
        if row is None or row["status"] != "queued":
            return None
        tags = json.loads(row["segment"]).get("tags") or []
        fast = await _skip_fk_checks(conn)
        status = await conn.execute(
            f"""INSERT INTO messages (campaign_id, lead_id, email, batch)
                SELECT $1, l.id, l.email, ((row_number() OVER (ORDER BY l.id)) - 1) / {BATCH_SIZE}
                FROM leads l
                WHERE l.status = 'active' AND (cardinality($2::text[]) = 0 OR l.tags && $2::text[])""",
            cid, tags)
        n = int(status.split()[-1])
        if fast:
            await conn.execute("SET LOCAL session_replication_role = origin")
        await conn.execute(
            """UPDATE campaigns SET recipients = $2::bigint, queued = $2::bigint, started_at = now(), updated_at = now(),
                      status = CASE WHEN $2::bigint = 0 THEN 'sent' ELSE 'sending' END,
                      finished_at = CASE WHEN $2::bigint = 0 THEN now() ELSE NULL END
               WHERE id = $1""", cid, n)
    return n


async def _skip_fk_checks(conn) -> bool:
    """Let the ledger INSERT skip the row-by-row foreign-key triggers of ``messages`` (they cost
    two thirds of its time: one lookup + FOR KEY SHARE lock of campaign and lead per row).

    Safe by construction: every row's campaign is locked FOR UPDATE in this transaction and its
    lead comes from the same statement. A lead deleted concurrently could leave a dangling
    ``lead_id``; the send path treats a missing lead as suppressed (the row is cancelled).
    Only done when ``messages`` has no user triggers (replica mode would skip them too) and the
    role may set ``session_replication_role`` (superuser, or GRANT SET ON PARAMETER); otherwise
    the normal, slower path runs."""
    has_triggers = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'messages'::regclass AND NOT tgisinternal)")
    if has_triggers:
        return False
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the outer transaction intact
            await conn.execute("SET LOCAL session_replication_role = replica")
    except asyncpg.PostgresError:
        return False
    return True


async def open_batches(pool, cid: int) -> list[int]:
    rows = await pool.fetch(
        "SELECT DISTINCT batch FROM messages WHERE campaign_id = $1 AND status IN ('pending', 'sending') ORDER BY batch",
        cid, timeout=LONG_COMMAND_TIMEOUT)  # a 2,000,000-row scan: longer than the API pool's 1 s
    return [r["batch"] for r in rows]


async def pause(pool, cid: int) -> None:
    await _transition(pool, cid, ("sending",), "paused")


async def resume(pool, cid: int) -> tuple[list[int], str | None]:
    """Back to sending; returns the batches still holding unsent recipients (to enqueue) and the
    outcome when nothing was left (the campaign finishes right here)."""
    async with pool.acquire() as conn, conn.transaction():
        cur = await conn.fetchrow("SELECT status, queued, sent, failed FROM campaigns WHERE id = $1 FOR UPDATE", cid)
        if cur is None:
            raise NotFound(f"no campaign {cid}")
        if cur["status"] != "paused":
            raise Conflict(f"campaign {cid} is {cur['status']}; only a paused campaign resumes", code="invalid_state")
        if cur["queued"] <= 0:
            await conn.execute("""UPDATE campaigns SET status = 'sent', finished_at = now(), updated_at = now(),
                                         pause_reason = NULL, auto_paused_at = NULL WHERE id = $1""", cid)
            outcome = await guardrails.after_record(conn, cid, "sent")  # by ratio, as the send path does
            return [], outcome
        # an explicit resume overrides a guard-rail: the reason is cleared and the guard-rails
        # count afresh from here (sender/guardrails.py), so the old figures do not pause it again
        await conn.execute("""UPDATE campaigns SET status = 'sending', pause_reason = NULL, auto_paused_at = NULL,
                                     guard_base = ARRAY[sent, failed, bounced, complained], updated_at = now()
                              WHERE id = $1""", cid)
        # the provider retry budget (sender/delivery.py) counts failing time, not paused time:
        # rows handed back during an outage and then paused start a fresh budget on resume
        await conn.execute("""UPDATE messages SET retry_since = NULL
                              WHERE campaign_id = $1 AND status = 'sending' AND retry_since IS NOT NULL""",
                           cid, timeout=LONG_COMMAND_TIMEOUT)
    return await open_batches(pool, cid), None


async def cancel(pool, cid: int, *, max_chunks: int | None = 1) -> tuple[str, int, bool]:
    """Cancel now (workers stop at their next batch), then mark unsent rows cancelled, at most
    ``max_chunks`` chunks here. Returns (previous status, rows cancelled, rows still to cancel?)."""
    prev = await _transition(pool, cid, ("draft", "queued", "sending", "paused"), "cancelled",
                             ", finished_at = now()")
    n, more = await cancel_pending(pool, cid, max_chunks=max_chunks)
    return prev, n, more


async def cancel_pending(pool, cid: int, *, max_chunks: int | None = None) -> tuple[int, bool]:
    """Pending rows of a cancelled campaign -> cancelled, in chunks of CANCEL_CHUNK rows, each
    chunk with its counter update (a 2,000,000-recipient campaign is never one long lock).
    Returns (rows cancelled, more left?)."""
    total = chunks = 0
    while max_chunks is None or chunks < max_chunks:
        chunks += 1
        async with pool.acquire() as conn, conn.transaction():
            n = _count(await conn.execute(
                f"""UPDATE messages SET status = 'cancelled', updated_at = now()
                    WHERE id IN (SELECT id FROM messages WHERE campaign_id = $1 AND status = 'pending'
                                 LIMIT {CANCEL_CHUNK} FOR UPDATE SKIP LOCKED)""", cid,
                timeout=LONG_COMMAND_TIMEOUT))
            if n:
                await conn.execute("UPDATE campaigns SET queued = queued - $2, updated_at = now() WHERE id = $1", cid, n)
        total += n
        if n < CANCEL_CHUNK:
            return total, False
    return total, True


def _count(status: str) -> int:
    return int(status.split()[-1])


#: failed recipients moved back to pending per transaction by retry-failed
RETRY_CHUNK = 20_000

#: one chunk of retry-failed: the next failed messages (keyset over message_failures, 0201) of
#: live campaigns whose lead is not suppressed (plus transactional ones when $1 is NULL) back to
#: pending, and their message_failures rows removed. Rows skipped (campaign cancelled, lead
#: suppressed) stay failed; the keyset moves past them, so every call ends.
RETRY_CHUNK_SQL = """
WITH pick AS (
    SELECT f.message_id FROM message_failures f
    WHERE ($1::bigint IS NULL OR f.campaign_id = $1) AND f.message_id > $2
    ORDER BY f.message_id LIMIT $3),
upd AS (
    UPDATE messages m SET status = 'pending', updated_at = now()
    FROM pick
    WHERE m.id = pick.message_id AND m.status = 'failed'
      AND (CASE WHEN m.campaign_id IS NULL THEN $1::bigint IS NULL
                ELSE EXISTS (SELECT 1 FROM campaigns c WHERE c.id = m.campaign_id
                                AND c.status IN ('sending', 'paused', 'sent', 'failed'))
                     AND NOT EXISTS (SELECT 1 FROM leads l WHERE l.id = m.lead_id AND l.status <> 'active')
           END)
    RETURNING m.id, m.campaign_id, m.batch),
-- rows moved, and stale rows (a message no longer failed, or gone) so they are not picked again
del AS (
    DELETE FROM message_failures f USING pick p
    WHERE f.message_id = p.message_id
      AND (p.message_id IN (SELECT id FROM upd)
           OR NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = p.message_id AND m.status = 'failed')))
SELECT (SELECT max(message_id) FROM pick) AS last, (SELECT count(*) FROM pick) AS picked,
       u.id, u.campaign_id, u.batch
FROM (SELECT 1) one LEFT JOIN upd u ON true
"""


async def retry_failed(pool, campaign_id: int | None = None, *,
                       chunk: int = RETRY_CHUNK) -> tuple[dict[int, list[int]], list[int]]:
    """Failed recipients (of live campaigns, leads not suppressed) back to pending, counters
    moved from failed to queued; finished campaigns go back to sending. Returns the batches to
    enqueue per campaign and the transactional message ids to enqueue (all of them when
    ``campaign_id`` is None).

    Works in transactions of at most ``chunk`` recipients, each with its counter update, so a
    campaign with 1,000,000 failures is never one long lock. Safe to repeat or to run twice at
    once: only rows still ``failed`` move (and are counted); a call interrupted between chunks
    leaves a consistent state (its campaigns already back to ``sending`` are re-dispatched by
    the sweeper, the rest stays failed for the next call)."""
    if campaign_id is not None:
        exists = await pool.fetchval("SELECT 1 FROM campaigns WHERE id = $1", campaign_id)
        if not exists:
            raise NotFound(f"no campaign {campaign_id}")
    batches: dict[int, set[int]] = {}
    tx: list[int] = []
    touched: set[int] = set()
    after = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(RETRY_CHUNK_SQL, campaign_id, after, chunk, timeout=LONG_COMMAND_TIMEOUT)
            per: dict[int, int] = {}
            for r in rows:
                if r["id"] is None:
                    continue
                if r["campaign_id"] is None:
                    tx.append(r["id"])
                else:
                    per[r["campaign_id"]] = per.get(r["campaign_id"], 0) + 1
                    batches.setdefault(r["campaign_id"], set()).add(r["batch"])
            if per:
                await conn.execute(
                    """UPDATE campaigns c SET failed = c.failed - x.n, queued = c.queued + x.n, updated_at = now(),
                              status = CASE WHEN c.status IN ('sent', 'failed') THEN 'sending' ELSE c.status END,
                              finished_at = CASE WHEN c.status IN ('sent', 'failed') THEN NULL ELSE c.finished_at END
                       FROM unnest($1::bigint[], $2::bigint[]) AS x(id, n) WHERE c.id = x.id""",
                    list(per), list(per.values()))
                touched.update(per)
        picked = rows[0]["picked"] if rows else 0
        if picked < chunk:
            break
        after = rows[0]["last"]
    # paused campaigns are enqueued by resume, not now
    paused = {r["id"] for r in await pool.fetch(
        "SELECT id FROM campaigns WHERE id = ANY($1::bigint[]) AND status = 'paused'", list(touched))}
    return {c: sorted(b) for c, b in batches.items() if c not in paused}, tx
