"""The provider call and its retries: idempotency keys, back-off, Retry-After, the retry budget.

Split out of :mod:`sender.sending` (which claims and renders) so the retry policy lives in one
place. ``sending`` imports :func:`deliver` from here; both record through :mod:`sender.ledger`,
which is below them (neither imports the other's internals).

Retry policy for a provider call that fails as a whole (5xx, timeout, connection, 429):

1. a few quick attempts inside the delivery (``settings.sender.max_attempts``, back-off
   ``backoff_base`` doubling, or the provider's Retry-After);
2. then :class:`ProviderUnavailable` (a :class:`dramatiq.Retry`) hands the batch back to dramatiq,
   which redelivers it after :func:`redelivery_delay`. The rows stay ``sending``; the redelivered
   batch claims them again under the advisory lock and calls the provider with the same
   idempotency key, so nothing the provider already accepted is sent twice;
3. recipients become ``failed`` (with the last error) only once they have been failing for
   ``settings.sender.send_retry_budget`` seconds, measured in Postgres from their first failed call
   (``messages.retry_since``), so the budget survives redeliveries and restarts. The actor's
   ``retry_when`` always retries :class:`ProviderUnavailable`: dramatiq's retry count never ends a
   batch before the budget does.

Every failed call counts once in ``mailgenius_provider_errors_total{provider, reason}``. A 429
sets a pause shared by the whole fleet (a Redis key that lives until the Retry-After deadline);
every worker waits it out before calling that provider.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
from typing import TYPE_CHECKING

import asyncpg
import dramatiq

from mailgenius.cache import rkey
from mailgenius.settings import SenderSettings

from .ledger import Lease, Outcome, mark_retry, record_durably
from .providers import OutEmail, ProviderError, SendResult

if TYPE_CHECKING:
    from .sending import SendContext

log = logging.getLogger(__name__)

#: atomically extend (never shorten) the fleet-wide provider pause: KEYS[1] pause key,
#: ARGV[1] milliseconds from now
PAUSE_LUA = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return left
"""


class ProviderUnavailable(dramatiq.Retry):
    """The provider kept failing during this delivery: dramatiq redelivers the batch later.

    A :class:`dramatiq.Retry`, so the worker does not log it as an unhandled error; ``delay`` is
    in milliseconds (dramatiq's unit).
    """

    def __init__(self, error: ProviderError, delay: float, failing_for: float,
                 budget: float = SenderSettings.send_retry_budget):
        super().__init__(f"provider unavailable ({error.reason}: {error.message}); failing for "
                         f"{failing_for:.0f} s of a {budget:.0f} s budget",
                         delay=int(delay * 1000))
        self.error = error
        self.failing_for = failing_for


def retry_when(retries: int, exc: BaseException, *,
               max_retries: int = SenderSettings.actor_max_retries) -> bool:
    """dramatiq ``retry_when`` of the send actors (bound to ``settings.sender.actor_max_retries``
    in sender/actors.py): a provider outage is retried until the retry budget (checked in
    Postgres by :func:`deliver`) ends it; anything else (Postgres down, a bug) at most
    ``max_retries`` times."""
    return isinstance(exc, ProviderUnavailable) or retries < max_retries


def idempotency_key(kind: str, owner: int, part: int, ids: list[int]) -> str:
    digest = hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()[:16]
    return f"mailgenius-{kind}{owner}-b{part}-{digest}"


def backoff(attempt: int, cfg: SenderSettings) -> float:
    return min(cfg.backoff_max, cfg.backoff_base * (2 ** (attempt - 1)))


def redelivery_delay(failing_for: float, error: ProviderError | None, cfg: SenderSettings) -> float:
    """Seconds before dramatiq redelivers a handed-back batch: the provider's Retry-After when it
    gave one, else half the time the batch has been failing (so the spacing roughly doubles),
    within ``cfg.redelivery_min``..``cfg.redelivery_max``, plus up to 20 % jitter so batches do not stampede."""
    if error is not None and error.retry_after is not None:
        base = min(error.retry_after, cfg.retry_after_max)
    else:
        base = failing_for / 2
    base = max(cfg.redelivery_min, min(cfg.redelivery_max, base))
    return base * (1 + 0.2 * random.random())


def _pause_key(ctx: SendContext, provider: str) -> str:
    return rkey(ctx.settings, "sender", "provider-pause", provider)


async def pause_provider(ctx: SendContext, provider: str, seconds: float) -> None:
    """Tell every worker to leave ``provider`` alone for ``seconds`` (a 429's Retry-After)."""
    ms = max(1, int(seconds * 1000))
    try:
        await ctx.redis.eval(PAUSE_LUA, 1, _pause_key(ctx, provider), ms)
    except Exception as exc:  # Redis down: this batch still waits (its own back-off)
        log.warning("could not share the provider pause", extra={"error": f"{type(exc).__name__}: {exc}"})


async def wait_provider_pause(ctx: SendContext, provider: str) -> float:
    """Sleep out the fleet-wide pause of ``provider`` if one is set; returns seconds slept."""
    try:
        left_ms = await ctx.redis.pttl(_pause_key(ctx, provider))
    except Exception:  # Redis down: no shared pause to honour (the rate limiter waits for Redis)
        return 0.0
    if left_ms is None or left_ms <= 0:
        return 0.0
    seconds = min(left_ms / 1000, ctx.settings.sender.retry_after_max)
    await asyncio.sleep(seconds)
    return seconds


async def _ready_to_record(ctx: SendContext, lease: Lease) -> None:
    """Raise (nothing sent, the rows stay ``sending`` for a later delivery) when Postgres is
    known to be unreachable: a dropped connection, or a record that failed in this process and
    has not succeeded since (then one round trip checks). Narrows the kill -9 window to the
    batches already talking to the relay when Postgres went away."""
    if lease.conn.is_closed():
        raise asyncpg.exceptions.ConnectionDoesNotExistError("the ledger connection was lost before sending")
    if ctx.journal is not None and ctx.journal.live:
        await lease.conn.fetchval("SELECT 1")


async def deliver(ctx: SendContext, lease: Lease, campaign_id: int | None, emails: list[OutEmail],
                  key_kind: str, owner: int, part: int, outcome: Outcome) -> None:
    """Send with retries, recording after every call (see the module docstring for the policy).

    Raises :class:`ProviderUnavailable` when the quick attempts are used up and the retry budget
    is not: the caller's advisory lock is released and dramatiq redelivers the batch.
    """
    provider = await ctx.provider(lease.conn)
    journal = ctx.journal if getattr(provider, "write_ahead", False) else None
    errors = ctx.metrics.provider_errors
    pending = emails
    attempt = 0
    while pending:
        attempt += 1
        if float((await ctx.settings_cache.get(lease.conn)).get("rate_limit") or 0) > 0:  # re-read every second
            await ctx.limiter.acquire(len(pending))
        await wait_provider_pause(ctx, provider.name)  # a 429 seen by any worker of the fleet
        key = idempotency_key(key_kind, owner, part, [e.message_id for e in pending])
        await _ready_to_record(ctx, lease)  # never send what could not be recorded
        # SMTP (no idempotency key): every 250 is written ahead to the journal as it comes, so a
        # kill -9 mid-batch loses none of the answers already read (sender/journal.py)
        wal = journal.open_batch(provider.name, campaign_id) if journal is not None else None
        try:
            try:
                if wal is None:
                    result = await provider.send_batch(pending, key)
                else:
                    result = await provider.send_batch(pending, key, on_accepted=functools.partial(journal.accepted, wal))
            except Exception as exc:  # a bug or an unexpected library error: retry like a 5xx
                log.exception("provider call raised")
                accepted = dict(journal.open[wal]["sent"]) if wal is not None and wal in journal.open else {}
                result = SendResult(accepted=accepted, retry=[e.message_id for e in pending if e.message_id not in accepted],
                                    error=ProviderError("server_error", f"{type(exc).__name__}: {exc}"[:500], True),
                                    call_error="server_error")
            if result.call_error:
                errors.labels(provider.name, result.call_error).inc()
            retry_ids = set(result.retry)
            failed = dict(result.rejected)
            err = result.error or ProviderError("server_error", "provider asked for a retry", True)
            delay = backoff(attempt, ctx.settings.sender)
            if err.retry_after is not None:
                delay = min(err.retry_after, ctx.settings.sender.retry_after_max)
            if retry_ids and err.reason == "rate_limited":  # first, before any other batch calls
                await pause_provider(ctx, provider.name, delay)
            # what the provider answered for good is recorded first, durably: an accepted send must
            # never be let go unrecorded (it would be claimed and sent again)
            await record_durably(ctx, lease, provider.name, campaign_id, result.accepted, failed, outcome,
                                 bounced=result.bounced & set(failed), details=result.details, wal=wal)
        except BaseException:
            # cancelled, time limit, the journal unwritable: what the relay accepted and is not
            # recorded stays in the journal, replayed before the next claim (no-op once retired)
            if wal is not None:
                journal.keep(wal)
            raise
        if not retry_ids:
            return
        failing_for = await mark_retry(lease.conn, retry_ids, f"{err.reason}: {err.message}"[:500], campaign_id)
        if failing_for >= ctx.settings.sender.send_retry_budget:
            gave_up = {i: (err.reason, f"gave up after {failing_for:.0f} s of provider errors (retry budget "
                                       f"{ctx.settings.sender.send_retry_budget:.0f} s): {err.message}"[:500])
                       for i in retry_ids}
            # (recording clears retry_since of every row it finalises: retry-failed starts a fresh budget)
            await record_durably(ctx, lease, provider.name, campaign_id, {}, gave_up, outcome,
                                 details={i: result.details[i] for i in retry_ids if i in result.details})
            return
        pending = [e for e in pending if e.message_id in retry_ids]
        if attempt >= ctx.settings.sender.max_attempts:
            redeliver = redelivery_delay(failing_for, err, ctx.settings.sender)
            log.warning("provider failing: batch handed back to the queue",
                        extra={"campaign_id": campaign_id, "batch": part, "attempts": attempt,
                               "reason": err.reason, "error": err.message, "failing_for": round(failing_for, 1),
                               "redeliver_in": round(redeliver, 1), "recipients": len(pending)})
            raise ProviderUnavailable(err, redeliver, failing_for, ctx.settings.sender.send_retry_budget)
        log.warning("provider call to retry", extra={"campaign_id": campaign_id, "attempt": attempt,
                                                     "reason": err.reason, "delay": delay, "error": err.message})
        await asyncio.sleep(delay)
