"""The stalled-campaign sweeper: the safety net for dramatiq messages lost in an outage.

With the Redis broker, a message whose retry or ack could not be written while Redis was down
stays in the ack set of a worker that is still alive, and is never redelivered; an enqueue that
failed mid-dispatch loses batches outright. The ledger knows better: a campaign that is
``sending`` with recipients still queued, no batch in progress (no advisory lock held on it) and
no progress for ``settings.sender.stall_seconds`` is re-dispatched (``dispatch_campaign`` enqueues its open
batches again; batches that were merely late become no-ops under the lock and the claim).
A ``queued`` campaign whose ledger never got written is re-dispatched after
``queued_stall_seconds``. One sweep per interval runs fleet-wide (a Redis lock), from every
worker process's sweeper thread.
"""

from __future__ import annotations

import asyncio
import logging

from mailgenius.broker import dramatiq_namespace
from mailgenius.cache import rkey
from mailgenius.metrics import QUEUE_EMAIL
from mailgenius.queues import redis_queue_stats
from mailgenius.settings import SenderSettings

from . import campaigns
from .periodic import PeriodicThread

log = logging.getLogger(__name__)

STALLED_SQL = """
UPDATE campaigns c SET updated_at = now()
WHERE (c.status = 'sending' AND c.queued > 0 AND c.updated_at < now() - make_interval(secs => $1)
       AND NOT EXISTS (SELECT 1 FROM pg_locks l
                       WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.classid = c.id::integer::oid
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())))
   OR (c.status = 'queued' AND c.updated_at < now() - make_interval(secs => $2))
RETURNING c.id, c.status
"""


async def find_stalled(pool, *, stall_seconds: float = SenderSettings.stall_seconds,
                       queued_stall_seconds: float = SenderSettings.queued_stall_seconds) -> list[int]:
    """Ids of stalled campaigns, marked (updated_at) so the next sweep leaves them a while."""
    rows = await pool.fetch(STALLED_SQL, float(stall_seconds), float(queued_stall_seconds))
    return [r["id"] for r in rows]


async def finish_cancellations(pool, *, stall_seconds: float = SenderSettings.stall_seconds) -> list[int]:
    """Cancelled campaigns whose pending rows were left (the API died mid-cleanup): finish them."""
    rows = await pool.fetch(
        """UPDATE campaigns SET updated_at = now()
           WHERE status = 'cancelled' AND queued > 0 AND updated_at < now() - make_interval(secs => $1)
           RETURNING id""", float(stall_seconds))
    for r in rows:
        await campaigns.cancel_pending(pool, r["id"])
    return [r["id"] for r in rows]


async def sweep_once(pool, redis, settings, enqueue_dispatch) -> list[int]:
    """One sweep (if no other process holds this interval's lock); returns re-dispatched ids."""
    got = await redis.set(rkey(settings, "sender", "sweep"), "1", nx=True,
                          px=max(1000, int(settings.sender.sweep_interval * 1000) - 500))
    if not got:
        return []
    if settings.broker_kind == "redis":
        stats = await redis_queue_stats(redis, dramatiq_namespace(settings), QUEUE_EMAIL)
        if stats.waiting > settings.sender.sweep_max_waiting:
            return []
    await finish_cancellations(pool, stall_seconds=settings.sender.stall_seconds)
    ids = await find_stalled(pool, stall_seconds=settings.sender.stall_seconds,
                             queued_stall_seconds=settings.sender.queued_stall_seconds)
    for cid in ids:
        log.warning("re-dispatching a stalled campaign", extra={"campaign_id": cid})
        await asyncio.get_running_loop().run_in_executor(None, enqueue_dispatch, cid)
    return ids


class SweeperThread(PeriodicThread):
    """Runs :func:`sweep_once` every ``settings.sender.sweep_interval`` seconds in its own event loop."""

    log = log
    failure = "sweep failed"

    def __init__(self, settings, enqueue_dispatch):
        super().__init__("sender-sweeper", settings)
        self.enqueue_dispatch = enqueue_dispatch

    @property
    def interval(self) -> float:
        return self.settings.sender.sweep_interval

    async def tick(self) -> None:
        await sweep_once(self.pool, self.redis, self.settings, self.enqueue_dispatch)
