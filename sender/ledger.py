"""The send path's ledger writes: what a batch claimed becomes ``sent``, ``failed`` or
``cancelled`` in Postgres, with the campaign's counters, and is never let go unrecorded.

Below both :mod:`sender.sending` (claims, renders, orchestrates) and :mod:`sender.delivery` (the
provider call and its retry policy); each imports this module and neither imports the other:

* :class:`Lease`: the connection a batch works on and the advisory lock it holds on it;
* :func:`record`: one round of outcomes and the campaign counters in one statement;
* :func:`record_durably`: the same, held on to through a Postgres outage (sender/journal.py);
* :func:`replay_journal`: records what a journal still holds, before the next claim;
* :func:`mark_retry`: notes the rows still waiting for the provider (the retry budget's start).

``ctx`` here is anything shaped like :class:`Recorder` (the send path's ``SendContext``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from mailgenius.settings import Settings

from . import guardrails
from .journal import Journal, decode_outcomes, encode_outcomes
from .metrics import SenderMetrics

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """What recording needs of the send path's context (sender/sending.py ``SendContext``)."""

    metrics: SenderMetrics
    #: the deployment's settings (the retry budget and back-off of recording come from ``.sender``)
    settings: Settings
    #: the relay answers Postgres could not take yet (sender/journal.py)
    journal: Journal | None

    async def count_stats(self, sent: int, failed: int) -> None: ...


@dataclass
class Outcome:
    """What one delivery of a batch did: rows recorded, the campaign's outcome if this finished
    it, and why nothing was sent (``detail``: locked, campaign paused, nothing to send)."""

    sent: int = 0
    failed: int = 0
    cancelled: int = 0
    finished: str | None = None
    detail: str = ""


#: one round of outcomes and the campaign counters in one statement (one round trip, atomic).
#: A hard bounce ($8) ends ``failed`` with delivery ``bounced``, counts in the campaign's
#: ``bounced`` and suppresses its lead (``leads.status = bounced``) in the same statement; every
#: failed row gets its report row (message_refusals, 0220: reason $11, stage $9, SMTP code $10).
RECORD_SQL = """
WITH s AS (
    UPDATE messages m SET status = 'sent', provider = $6, provider_message_id = v.pid,
           sent_at = now(), updated_at = now(), last_error = NULL, retry_since = NULL
    FROM unnest($1::bigint[], $2::text[]) AS v(id, pid)
    WHERE m.id = v.id AND m.status = 'sending'
    RETURNING m.id, v.pid),
f AS (
    UPDATE messages m SET status = v.st, provider = $6, last_error = v.err, updated_at = now(),
           retry_since = NULL,  -- a final state: a later retry-failed starts a fresh budget
           delivery = CASE WHEN v.bounce THEN 'bounced' ELSE m.delivery END
    FROM unnest($3::bigint[], $4::text[], $5::text[], $8::bool[], $9::text[], $10::int[], $11::text[])
         AS v(id, err, st, bounce, stage, code, reason)
    WHERE m.id = v.id AND m.status = 'sending'
    RETURNING m.id, m.campaign_id, m.status, m.lead_id, m.email, v.bounce, v.stage, v.code, v.reason),
-- the lookups that must not be indexes of messages (0201: they would make both updates non-HOT);
-- one row per message sent (rows leave 'sending' once), hash-indexed (0202)
pids AS (
    INSERT INTO message_provider_ids (provider_message_id, message_id)
    SELECT pid, id FROM s WHERE pid <> ''),
fails AS (
    INSERT INTO message_failures (message_id, campaign_id)
    SELECT id, campaign_id FROM f WHERE status = 'failed' ON CONFLICT DO NOTHING),
refusals AS (
    INSERT INTO message_refusals (message_id, campaign_id, reason, stage, smtp_code)
    SELECT id, campaign_id, reason, stage, code FROM f WHERE status = 'failed'
    ON CONFLICT (message_id) DO UPDATE SET reason = EXCLUDED.reason, stage = EXCLUDED.stage,
        smtp_code = EXCLUDED.smtp_code, failed_at = now()),
suppressed AS (
    UPDATE leads l SET status = 'bounced', updated_at = now()
    FROM f
    WHERE f.bounce AND l.status IN ('active', 'unsubscribed')
      AND (l.id = f.lead_id OR (f.lead_id IS NULL AND lower(l.email) = lower(f.email)))
    RETURNING l.id),
n AS (
    SELECT (SELECT count(*) FROM s) AS sent,
           (SELECT count(*) FROM f WHERE status = 'failed') AS failed,
           (SELECT count(*) FROM f WHERE status = 'failed' AND bounce) AS bounced,
           (SELECT count(*) FROM f WHERE status = 'cancelled') AS cancelled,
           (SELECT count(*) FROM suppressed) AS suppressed),
old AS (SELECT id, status FROM campaigns WHERE id = $7::bigint FOR UPDATE),
c AS (
    UPDATE campaigns c
    SET queued = c.queued - (n.sent + n.failed + n.cancelled), sent = c.sent + n.sent,
        failed = c.failed + n.failed, bounced = c.bounced + n.bounced, updated_at = now(),
        status = CASE WHEN c.status = 'sending' AND c.queued - (n.sent + n.failed + n.cancelled) <= 0
                      THEN (CASE WHEN c.sent + n.sent > 0 OR c.failed + n.failed = 0 THEN 'sent' ELSE 'failed' END)
                      ELSE c.status END,
        finished_at = CASE WHEN c.status = 'sending' AND c.queued - (n.sent + n.failed + n.cancelled) <= 0
                           THEN now() ELSE c.finished_at END
    FROM old, n WHERE c.id = old.id AND n.sent + n.failed + n.cancelled > 0
    RETURNING old.status AS old_status, c.status AS new_status)
SELECT n.sent, n.failed, n.bounced, n.cancelled, n.suppressed, c.old_status, c.new_status FROM n LEFT JOIN c ON true
"""

#: rows of this delivery that still need the provider: note the first failure (the budget's
#: start), the last error, and touch the campaign so the stalled-campaign sweeper knows the batch
#: is being retried rather than lost. Returns seconds since the oldest row's first failure.
MARK_RETRY_SQL = """
WITH u AS (
    UPDATE messages SET retry_since = coalesce(retry_since, now()), last_error = $2, updated_at = now()
    WHERE id = ANY($1::bigint[]) AND status = 'sending'
    RETURNING retry_since),
c AS (
    UPDATE campaigns SET updated_at = now() WHERE id = $3::bigint AND status = 'sending' RETURNING 1)
SELECT extract(epoch FROM now() - min(u.retry_since))::float8 AS failing_for FROM u
"""

#: errors that mean "Postgres is unreachable (or dropped us)", not "this statement is wrong":
#: recording the relay's answers is retried through them (plus deadlocks, retried as usual)
DB_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.DeadlockDetectedError,
)


#: seconds a batch waits for a sibling process replaying a dead worker's journal before claiming
JOURNAL_WAIT = 30.0


class Lease:
    """The Postgres connection a batch works on (and the advisory lock it holds on it).

    Postgres may drop it mid-batch; :meth:`reconnect` takes a fresh connection from the pool and
    tries to take the lock again, so the batch can record what the provider already accepted.
    """

    def __init__(self, pool, lock_sql: str, unlock_sql: str, lock_args: tuple):
        self.pool = pool
        self.lock_sql, self.unlock_sql, self.lock_args = lock_sql, unlock_sql, lock_args
        self.conn = None
        self.locked = False

    async def __aenter__(self) -> Lease:
        self.conn = await self.pool.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.locked:
                await conn.execute(self.unlock_sql, *self.lock_args)
        except DB_DOWN_ERRORS:
            pass  # a dropped connection: its session locks died with it
        finally:
            await self._release(conn)

    async def _release(self, conn) -> None:
        try:
            await self.pool.release(conn, timeout=5)
        except Exception:  # noqa: BLE001 - a broken connection: the pool replaces it
            conn.terminate()

    async def reconnect(self) -> None:
        old, self.conn = self.conn, None
        self.locked = False
        if old is not None:
            await self._release(old)
        self.conn = await self.pool.acquire(timeout=5)
        # the lock died with the old session; take it again unless a newer delivery holds it
        self.locked = bool(await self.conn.fetchval(self.lock_sql, *self.lock_args))


async def record(ctx: Recorder, conn, provider: str, campaign_id: int | None,
                 sent: dict[int, str], failed: dict[int, tuple[str, str]], cancelled: list[int],
                 outcome: Outcome, *, bounced: set[int] | frozenset = frozenset(),
                 details: dict[int, tuple[str, int | None]] | None = None) -> None:
    """Write one round of outcomes and the campaign counters (one atomic statement).

    ``failed``: id -> (reason, text); ``bounced``: the failed ids that are hard bounces (their
    leads are suppressed); ``details``: id -> (SMTP stage, reply code) for the failures report."""
    if not sent and not failed and not cancelled:
        return
    details = details or {}
    ids = list(failed) + cancelled
    errs = [failed[i][1] for i in failed] + ["lead is suppressed"] * len(cancelled)
    sts = ["failed"] * len(failed) + ["cancelled"] * len(cancelled)
    bounce = [i in bounced for i in failed] + [False] * len(cancelled)
    stages = [details.get(i, (None, None))[0] for i in failed] + [None] * len(cancelled)
    codes = [details.get(i, (None, None))[1] for i in failed] + [None] * len(cancelled)
    reasons = [failed[i][0] for i in failed] + ["suppressed"] * len(cancelled)
    row = await conn.fetchrow(RECORD_SQL, list(sent), list(sent.values()), ids, errs, sts, provider, campaign_id,
                              bounce, stages, codes, reasons)
    n_sent, n_failed, n_cancelled = row["sent"], row["failed"], row["cancelled"]
    if row["bounced"]:
        ctx.metrics.events.labels(provider, "bounced").inc(row["bounced"])  # as a provider's bounce event
    outcome.sent += n_sent
    outcome.failed += n_failed
    outcome.cancelled += n_cancelled
    m = ctx.metrics
    if n_sent:
        m.sent.labels(provider).inc(n_sent)
    reasons: dict[str, int] = {}
    for reason, _msg in failed.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in reasons.items():
        m.failures.labels(provider, reason).inc(n)
    finished = row["new_status"] if row["old_status"] == "sending" and row["new_status"] in ("sent", "failed") else None
    # issue 15: a finished campaign's outcome by its failed share; a sending one's guard-rails
    finished = await guardrails.after_record(conn, campaign_id, finished, m)
    if finished:
        outcome.finished = finished
        m.campaigns_finished.labels(finished).inc()
        log.info("campaign finished", extra={"campaign_id": campaign_id, "outcome": finished})
    await ctx.count_stats(n_sent, n_failed)


async def record_durably(ctx: Recorder, lease: Lease, provider: str, campaign_id: int | None,
                         sent: dict[int, str], failed: dict[int, tuple[str, str]], outcome: Outcome, *,
                         bounced: set[int] | None = None,
                         details: dict[int, tuple[str, int | None]] | None = None,
                         wal: str | None = None) -> None:
    """Record a provider's answers, holding on to them through a Postgres outage.

    The first failure journals them (sender/journal.py, fsync'd) and the record is retried on a
    fresh connection with back-off for up to the retry budget; if it still fails, or the worker
    stops meanwhile, the journal keeps the entry for replay and the error propagates. Nothing the
    provider accepted is let go unrecorded *and* unjournaled.

    ``wal``: the journal key of the call's write-ahead (SMTP, sender/delivery.py ``deliver``); it
    is retired once the answers are recorded or the outage entry holds them, and on an error that
    is not an outage (a bug: replaying it would fail the same way before every claim). If the
    batch is interrupted instead (cancelled, time limit), ``deliver`` keeps it for replay.
    """
    bounced, details = bounced or set(), details or {}
    journal = ctx.journal
    try:
        await record(ctx, lease.conn, provider, campaign_id, sent, failed, [], outcome,
                      bounced=bounced, details=details)
    except DB_DOWN_ERRORS as exc:
        first = exc
    except Exception:
        if wal is not None:  # not an outage (a bug): replaying it would fail the same way forever
            journal.close_batch(wal)
        raise
    else:
        if wal is not None:
            journal.close_batch(wal)
        return
    if not sent and not failed:
        if wal is not None:
            journal.close_batch(wal)
        raise first
    key = journal.write(encode_outcomes(provider, campaign_id, sent, failed, bounced, details))
    if wal is not None:
        journal.close_batch(wal)  # the fsync'd entry holds every answer of the call now
    log.warning("could not record the provider's answers; journaled, retrying",
                extra={"campaign_id": campaign_id, "sent": len(sent), "failed": len(failed),
                       "error": f"{type(first).__name__}: {first}"})
    deadline = time.monotonic() + ctx.settings.sender.send_retry_budget
    delay = ctx.settings.sender.record_retry_base
    try:
        while True:
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)
            try:
                await lease.reconnect()
                await record(ctx, lease.conn, provider, campaign_id, sent, failed, [], outcome,
                              bounced=bounced, details=details)
            except DB_DOWN_ERRORS:
                if time.monotonic() >= deadline:
                    raise
                continue
            journal.done(key)
            log.info("recorded the journaled answers", extra={"campaign_id": campaign_id, "sent": len(sent)})
            return
    except BaseException:
        journal.abandon(key)  # replayed before this process's next claim, or by the next worker
        raise


async def replay_journal(ctx: Recorder, conn) -> int:
    """Record what this process's journal and dead processes' journals still hold.
    Returns the number of entries recorded. Raises if Postgres is still unreachable."""
    journal = ctx.journal
    done = 0
    for entry in journal.pending():
        provider, cid, sent, failed, bounced, details = decode_outcomes(entry)
        await record(ctx, conn, provider, cid, sent, failed, [], Outcome(), bounced=bounced, details=details)
        journal.done(entry["key"])
        done += 1
    waited = 0.0
    while journal.foreign_pending:
        found, busy = journal.foreign()
        for path, fh, entries in found:
            try:
                for entry in entries:
                    provider, cid, sent, failed, bounced, details = decode_outcomes(entry)
                    await record(ctx, conn, provider, cid, sent, failed, [], Outcome(), bounced=bounced,
                                  details=details)
                    done += 1
            except BaseException:
                journal.release_foreign(fh)
                raise
            journal.finish_foreign(path, fh)
            log.warning("replayed a journal left by a stopped worker", extra={"path": path, "entries": len(entries)})
        if not busy:
            journal.foreign_pending = False
        elif waited >= JOURNAL_WAIT:  # a sibling is still replaying: let dramatiq retry this batch
            raise RuntimeError("a stopped worker's send journal is still being replayed")
        else:
            await asyncio.sleep(0.1)
            waited += 0.1
    return done


async def mark_retry(conn, ids, error: str, campaign_id: int | None) -> float:
    """Note that ``ids`` still need the provider (:data:`MARK_RETRY_SQL`); returns seconds since
    the oldest one's first failure."""
    row = await conn.fetchrow(MARK_RETRY_SQL, list(ids), error, campaign_id)
    return float(row["failing_for"] or 0.0) if row is not None else 0.0
