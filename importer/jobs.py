"""The import state machine: every statement that changes ``imports.status``, and the one JSON
view of an ``imports`` row. The routes, the actor and the loader call these functions; none of
them spells a status word or writes ``status =`` itself.

::

    queued ──claim──▶ running ──finish──▶ completed | failed | cancelled
       │                 │ ▲
       │                 └─┘ claim again: a redelivered message resumes from the checkpoint
       ├──request_cancel──▶ cancelled      (no worker has it yet)
       └──finish(failed)──▶ failed         (the job queue refused the message; the retries ran out)

    running ──request_cancel──▶ running with cancel_requested; the worker sees the flag and
                                finishes the import as cancelled, keeping its committed batches
    queued | running ──requeue──▶ unchanged status, one more message (the upload cleanup's
                                  answer to an import without progress: the job resumes)

:data:`TRANSITIONS` is that table; each UPDATE's ``WHERE status IN (...)`` is generated from it,
so a statement cannot move an import along an edge the table does not have. The vocabulary
(the words, :data:`ACTIVE`, :data:`FINISHED`) lives in the kernel, :mod:`mailgenius.import_states`,
because the exporter counts imports by status too.

The functions take a pool or a connection (anything with ``fetch``/``fetchrow``/``fetchval``/
``execute``): the loader runs them on the connection that holds the import's advisory lock.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Iterable

from mailgenius import errors
from mailgenius.db import fetchrow_read
from mailgenius.import_states import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    STATUSES,
    progress,
    sql_list,
)

#: status -> the statuses it may move to (finished imports never move)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, FAILED, CANCELLED),
    RUNNING: (RUNNING, COMPLETED, FAILED, CANCELLED),
    COMPLETED: (),
    FAILED: (),
    CANCELLED: (),
}


def sources(status: str) -> tuple[str, ...]:
    """The statuses an import may be in to move to ``status``."""
    return tuple(s for s in STATUSES if status in TRANSITIONS[s])


# -- the JSON view -----------------------------------------------------------------------------

IMPORT_FIELDS = ("id", "status", "filename", "bytes", "sha256", "mode", "tags", "source", "encoding",
                 "delimiter", "total_rows", "processed_rows", "inserted", "updated", "duplicates",
                 "skipped_existing", "invalid", "error", "cancel_requested", "attempts", "created_at",
                 "started_at", "finished_at", "columns", "mapping")
_COLUMNS = f"{', '.join(IMPORT_FIELDS)}, updated_at"
#: the columns :func:`view` reads (``SELECT + " WHERE ..."``)
SELECT = f"SELECT {_COLUMNS} FROM imports"


def view(row, live: int | None = None, now: float | None = None) -> dict:
    """The JSON of one import, with rows_per_second, eta_seconds and progress_percent computed;
    ``live`` is the worker's live processed count of a running import (Redis), used when ahead
    of the committed one."""
    d = {k: row[k] for k in IMPORT_FIELDS}
    d["tags"] = list(d["tags"] or [])
    for k in ("columns", "mapping"):  # jsonb arrives as text
        if isinstance(d[k], str):
            d[k] = json.loads(d[k])
    processed = d["processed_rows"]
    if d["status"] == RUNNING and live is not None and live > processed:
        processed = live
    d["processed_rows"] = processed
    d.update(progress(d["status"], processed, d["total_rows"], row["started_at"], row["finished_at"],
                      dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)))
    return d


# -- reads -------------------------------------------------------------------------------------

async def get_row(pool, import_id: int):
    """The row :func:`view` needs, or None (read without a reset round trip)."""
    return await fetchrow_read(pool, SELECT + " WHERE id = $1", import_id)


async def list_rows(pool, status: str | None, limit: int, offset: int) -> list:
    """Imports newest first, optionally of one status."""
    return await pool.fetch(
        SELECT + " WHERE ($1::text IS NULL OR status = $1) ORDER BY id DESC LIMIT $2 OFFSET $3",
        status, limit, offset)


async def active_rows(pool, limit: int = 50) -> list:
    """Queued and running imports, oldest first."""
    return await pool.fetch(SELECT + f" WHERE status IN {sql_list(ACTIVE)} ORDER BY id LIMIT $1", limit)


async def recent_counts(pool) -> dict[str, int]:
    """Imports by status: every status, active ones whatever their age, the others of 24 h."""
    counts = {r["status"]: r["n"] for r in await pool.fetch(
        f"""SELECT status, count(*) AS n FROM imports
            WHERE status IN {sql_list(ACTIVE)} OR created_at > now() - interval '24 hours'
            GROUP BY status""")}
    return {s: counts.get(s, 0) for s in STATUSES}


async def status_of(pool, import_id: int) -> str | None:
    return await pool.fetchval("SELECT status FROM imports WHERE id = $1", import_id)


async def attempts(pool, import_id: int) -> int:
    """Deliveries that started the job (claims), 0 for an unknown import."""
    return await pool.fetchval("SELECT attempts FROM imports WHERE id = $1", import_id) or 0


async def active_paths(pool) -> set[str]:
    """The upload files queued or running imports still need, as stored (absolute paths)."""
    return {r["path"] for r in await pool.fetch(
        f"SELECT path FROM imports WHERE status IN {sql_list(ACTIVE)} AND path IS NOT NULL")}


async def stuck_ids(pool, stuck_after: float) -> list[int]:
    """Active imports without a cancel request and without progress for ``stuck_after`` seconds."""
    return [r["id"] for r in await pool.fetch(
        f"""SELECT id FROM imports WHERE status IN {sql_list(ACTIVE)} AND NOT cancel_requested
            AND updated_at < now() - make_interval(secs => $1) ORDER BY id""", stuck_after)]


# -- transitions -------------------------------------------------------------------------------

async def create(pool, *, filename: str, path: str, size: int, sha256: str, mode: str,
                 tags: list[str], source: str | None, columns: dict | None):
    """A new queued import; returns its row (the columns :func:`view` reads)."""
    return await pool.fetchrow(
        f"""INSERT INTO imports (status, filename, path, bytes, sha256, mode, tags, source, columns)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb) RETURNING {_COLUMNS}""",
        QUEUED, filename, path, size, sha256, mode, tags, source,
        None if columns is None else json.dumps(columns))


_CLAIM = f"""UPDATE imports SET status = '{RUNNING}', started_at = COALESCE(started_at, now()),
                 attempts = attempts + 1, updated_at = now()
             WHERE id = $1 AND status IN {sql_list(sources(RUNNING))} AND NOT cancel_requested
             RETURNING *"""


async def claim(conn, import_id: int):
    """Start (or resume) the import: running, one more attempt. Returns the whole row, or None
    when the import is finished or a cancel was requested."""
    return await conn.fetchrow(_CLAIM, import_id)


def _finish_sql(status: str) -> str:
    total = ", total_rows = processed_rows" if status == COMPLETED else ""
    return f"""UPDATE imports SET status = '{status}', error = $2, finished_at = now(), updated_at = now(){total}
               WHERE id = $1 AND status IN {sql_list(sources(status))}
               RETURNING started_at, finished_at"""


_FINISH = {s: _finish_sql(s) for s in FINISHED}


async def finish(conn, import_id: int, status: str, error: str | None = None):
    """End the import as ``status`` (completed, failed or cancelled) with ``error``; a completed
    import's total becomes its processed count. Returns (started_at, finished_at), or None when
    the import was not in a status that can move there (already finished: nothing changed)."""
    if status not in _FINISH:
        raise ValueError(f"not a finished status: {status!r}")
    return await conn.fetchrow(_FINISH[status], import_id, error)


async def record_retry(pool, import_id: int, error: str) -> None:
    """A running attempt failed and will be retried: note why; the status stays running."""
    await pool.execute(f"UPDATE imports SET error = $2, updated_at = now() WHERE id = $1 AND status = '{RUNNING}'",
                       import_id, error)


_CANCEL = f"""UPDATE imports SET cancel_requested = true,
                  status = CASE WHEN status = '{QUEUED}' THEN '{CANCELLED}' ELSE status END,
                  finished_at = CASE WHEN status = '{QUEUED}' THEN now() ELSE finished_at END,
                  updated_at = now()
              WHERE id = $1 AND status IN {sql_list(ACTIVE)}
              RETURNING status"""


async def request_cancel(pool, import_id: int) -> str:
    """Ask the import to stop: a queued one is cancelled at once, a running one keeps running
    with ``cancel_requested`` until its worker sees the flag. Returns the status afterwards;
    NotFound for an unknown import, Conflict for a finished one."""
    status = await pool.fetchval(_CANCEL, import_id)
    if status is None:
        current = await status_of(pool, import_id)
        if current is None:
            raise errors.NotFound(f"no import with id {import_id}")
        raise errors.Conflict(f"import {import_id} is already {current}; nothing to cancel")
    return status


async def requeue(pool, import_ids: Iterable[int], enqueue: Callable[[int], Awaitable[None]]) -> None:
    """Send each (active) import a new message and mark it touched, so the next cleanup waits
    ``stuck_after`` again; the status is unchanged (the job resumes from its checkpoint, and a
    job still running ignores the extra delivery: it holds the import's advisory lock)."""
    for iid in import_ids:
        await enqueue(iid)
        await pool.execute(f"UPDATE imports SET updated_at = now() WHERE id = $1 AND status IN {sql_list(ACTIVE)}",
                           iid)
