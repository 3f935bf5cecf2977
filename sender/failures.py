"""A campaign's failed recipients with the reason: ``GET /api/campaigns/{id}/failures`` (JSON,
keyset-paged) and its CSV export (``?format=csv`` or ``/failures.csv``, every page streamed).

Reads ``message_refusals`` (migration 0220, written by the send path's record statement) joined
to ``messages``: one row per recipient that is still ``failed``, or that bounced after it was
sent, with

* ``status``: ``bounced`` for a hard bounce (the relay said the mailbox does not exist; the lead
  was suppressed) or ``failed``;
* ``reason``: the failure label (``bounced``, ``rejected``, ``smtputf8``, ``deferred``,
  ``render_error``, ``server_error``...), ``error``: the relay's reply text or our message;
* ``stage``: where the SMTP conversation ended (``connect``, ``MAIL``, ``RCPT``, ``DATA``; null
  for a failure before the provider or on Resend; ``report`` for a hard bounce reported after the
  send: a DSN from the bounce mailbox, the bounce webhook, Resend's ``email.bounced``),
  ``smtp_code``: the reply code;
* ``failed_at``.

Paging: ``limit`` (1-1000, default 100) rows after ``after`` (a message id, default 0), ordered by
message id; every page but the last is full; ``next_after`` is the cursor of the next page, null
on a page that is not full (a full last page is followed by an empty one).
"""

from __future__ import annotations

import csv
import io

from aiohttp import web

from mailgenius.errors import NotFound, ValidationError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
CSV_PAGE = 1000
MAX_ID = 2**63 - 1
CSV_COLUMNS = ("message_id", "email", "status", "reason", "error", "stage", "smtp_code", "failed_at")

#: one page: the next ``limit`` report rows of the campaign that are still failed, or bounced
#: after they were sent (a requeued recipient keeps its report row until it fails again; it is
#: skipped in the scan, so a page is short only when it is the last). Walks
#: message_refusals_campaign_idx in message id order, joining each row's message by primary key.
PAGE_SQL = """
SELECT r.message_id, r.reason, r.stage, r.smtp_code, r.failed_at, m.email, m.delivery, m.last_error
FROM message_refusals r JOIN messages m ON m.id = r.message_id
WHERE r.campaign_id = $1 AND r.message_id > $2 AND (m.status = 'failed' OR m.delivery = 'bounced')
ORDER BY r.message_id
LIMIT $3
"""


def _int(query, name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name}: expected an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ValidationError(f"{name}: must be between {lo} and {hi}")
    return value


async def page(pool, campaign_id: int, after: int = 0, limit: int = DEFAULT_LIMIT) -> dict:
    rows = await pool.fetch(PAGE_SQL, campaign_id, after, limit)
    if not rows and not await pool.fetchval("SELECT 1 FROM campaigns WHERE id = $1", campaign_id):
        raise NotFound(f"no campaign {campaign_id}")
    items = [{"message_id": r["message_id"], "email": r["email"],
              "status": "bounced" if r["delivery"] == "bounced" else "failed",
              "reason": r["reason"], "error": r["last_error"], "stage": r["stage"], "smtp_code": r["smtp_code"],
              "failed_at": r["failed_at"].isoformat()}
             for r in rows]
    more = len(rows) == limit
    return {"campaign_id": campaign_id, "failures": items, "next_after": rows[-1]["message_id"] if more else None}


def wants_csv(request: web.Request) -> bool:
    fmt = request.query.get("format", "")
    if fmt not in ("", "json", "csv"):
        raise ValidationError("format: expected json or csv")
    return fmt == "csv" or request.path.endswith(".csv")


def parse(request: web.Request) -> tuple[int, int]:
    q = request.query
    return _int(q, "after", 0, 0, MAX_ID), _int(q, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)


async def csv_response(request: web.Request, pool, campaign_id: int) -> web.StreamResponse:
    """Every failed recipient of the campaign as CSV, streamed page by page."""
    first = await page(pool, campaign_id, 0, CSV_PAGE)  # 404 before any byte is sent
    resp = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="campaign-{campaign_id}-failures.csv"'})
    await resp.prepare(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    current = first
    while True:
        for item in current["failures"]:
            writer.writerow([_cell(item[c]) for c in CSV_COLUMNS])
        await resp.write(out.getvalue().encode())
        out.seek(0)
        out.truncate()
        if current["next_after"] is None:
            break
        current = await page(pool, campaign_id, current["next_after"], CSV_PAGE)
    await resp.write_eof()
    return resp


def _cell(value) -> str:
    """A CSV cell; a leading = + - @ is quoted away so a spreadsheet never runs it as a formula."""
    if value is None:
        return ""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
