"""dramatiq actors of the ``email-sending`` queue (run with ``mailgenius worker sender``).

* ``dispatch_campaign(campaign_id)``: writes the recipient ledger of a queued campaign (once),
  then enqueues one ``send_campaign_batch`` per batch still holding unsent recipients; the API
  also enqueues it on resume and retry-failed.
* ``send_campaign_batch(campaign_id, batch)``: see sender/sending.py; provider outages are
  handed back to dramatiq and retried until the retry budget (sender/delivery.py).
* ``send_transactional_email(message_id)``.

Each worker process also runs the stalled-campaign sweeper and, when configured, the bounce
mailbox poller (sender/mailbox.py), in threads.

Every actor is safe to run twice: the ledger and the advisory locks make repeats no-ops.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import dramatiq

from mailgenius import logs
from mailgenius.metrics import QUEUE_EMAIL
from mailgenius.settings import in_worker_process
from mailgenius.worker import enqueue, resources, worker_setup

from . import campaigns, config, delivery
from .mailbox import MailboxConfig, MailboxThread
from .metrics import SenderMetrics
from .sending import SendContext
from .sending import send_campaign_batch as _send_batch
from .sending import send_transactional as _send_tx
from .sweeper import SweeperThread

#: loaded once per worker process; its ``sender`` part is handed to everything below
settings, broker = worker_setup("sender")

log = logging.getLogger("sender.actors")


class Sweeper(dramatiq.Middleware):
    """Starts the stalled-campaign sweeper thread (sender/sweeper.py) in each worker process.

    Parameters: none; its timings come from ``settings.sender`` (sweep_interval, stall_seconds).
    """

    def __init__(self):
        self.logger = logging.getLogger(type(self).__name__)
        self.thread = None

    def after_worker_boot(self, broker, worker):
        self.thread = SweeperThread(settings, lambda cid: enqueue(broker, QUEUE_EMAIL, "dispatch_campaign", cid))
        self.thread.start()

    def before_worker_shutdown(self, broker, worker):
        if self.thread is not None:
            self.thread.stop_event.set()


class BounceMailbox(dramatiq.Middleware):
    """Starts the bounce mailbox poller thread (sender/mailbox.py) in each worker process when
    ``MAILGENIUS_BOUNCE_MAILBOX_HOST`` is set (one poll per interval runs fleet-wide).

    Parameters: none; the mailbox and interval come from settings (MAILGENIUS_BOUNCE_MAILBOX_*).
    """

    def __init__(self):
        self.thread = None

    def after_worker_boot(self, broker, worker):
        cfg = MailboxConfig.from_settings(settings)
        if cfg is not None:
            self.thread = MailboxThread(settings, METRICS, cfg)
            self.thread.start()

    def before_worker_shutdown(self, broker, worker):
        if self.thread is not None:
            self.thread.stop_event.set()


METRICS = SenderMetrics()  # the global registry: multiprocess files under `mailgenius worker`
if in_worker_process():
    broker.add_middleware(Sweeper())
    broker.add_middleware(BounceMailbox())
_contexts: dict[int, SendContext] = {}
_ctx_lock: dict[int, asyncio.Lock] = {}

#: dramatiq retries for unexpected errors (Postgres down...): at most settings.sender.actor_max_retries
RETRY_OPTIONS = {"max_retries": settings.sender.actor_max_retries, "min_backoff": 1000, "max_backoff": 60_000}
#: the send actors: a provider outage (delivery.ProviderUnavailable, which carries its own delay)
#: is retried until the retry budget, checked in Postgres, marks the recipients failed
SEND_RETRY_OPTIONS = {**RETRY_OPTIONS, "retry_when": functools.partial(
    delivery.retry_when, max_retries=settings.sender.actor_max_retries)}


async def context() -> SendContext:
    loop_id = id(asyncio.get_running_loop())
    ctx = _contexts.get(loop_id)
    if ctx is None:
        lock = _ctx_lock.setdefault(loop_id, asyncio.Lock())
        async with lock:
            ctx = _contexts.get(loop_id)
            if ctx is None:
                res = await resources(settings)
                ctx = await SendContext(res.pool, res.redis, settings, METRICS).start()
                _contexts[loop_id] = ctx
    return ctx


def _enqueue_batches(campaign_id: int, batches) -> None:
    for b in batches:
        enqueue(broker, QUEUE_EMAIL, "send_campaign_batch", campaign_id, b)


@dramatiq.actor(queue_name=QUEUE_EMAIL, actor_name="dispatch_campaign", time_limit=30 * 60_000, **RETRY_OPTIONS)
async def dispatch_campaign(campaign_id: int) -> None:
    ctx = await context()
    with logs.bound(campaign_id=campaign_id):
        n = await campaigns.write_ledger(ctx.pool, campaign_id)
        if n is not None:
            log.info("ledger written", extra={"recipients": n})
            batches = range((n + config.BATCH_SIZE - 1) // config.BATCH_SIZE)
        else:
            status = await ctx.pool.fetchval("SELECT status FROM campaigns WHERE id = $1", campaign_id)
            if status != "sending":
                return
            batches = await campaigns.open_batches(ctx.pool, campaign_id)
        if n == 0:
            ctx.metrics.campaigns_finished.labels("sent").inc()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(_enqueue_batches, campaign_id, list(batches)))
        log.info("batches enqueued", extra={"batches": len(batches)})


@dramatiq.actor(queue_name=QUEUE_EMAIL, actor_name="send_campaign_batch", time_limit=15 * 60_000, **SEND_RETRY_OPTIONS)
async def send_campaign_batch(campaign_id: int, batch: int) -> None:
    ctx = await context()
    with logs.bound(campaign_id=campaign_id):
        out = await _send_batch(ctx, campaign_id, batch)
        if out.failed:
            log.warning("batch had failures", extra={"batch": batch, "sent": out.sent, "failed": out.failed})


@dramatiq.actor(queue_name=QUEUE_EMAIL, actor_name="send_transactional_email", time_limit=15 * 60_000,
                **SEND_RETRY_OPTIONS)
async def send_transactional_email(message_id: int) -> None:
    ctx = await context()
    out = await _send_tx(ctx, message_id)
    if out.failed:
        log.warning("transactional email failed", extra={"message_id": message_id})
