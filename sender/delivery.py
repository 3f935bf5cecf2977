"""The provider call and its retries: idempotency keys, back-off, Retry-After.

Split out of :mod:`sender.sending` (which claims, renders and records) so the retry policy lives
in one place. ``sending`` imports ``_deliver`` from here; ``_deliver`` imports ``sending._record``
at call time, so neither import order is circular.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from . import config
from .providers import OutEmail, ProviderError, SendResult

if TYPE_CHECKING:
    from .sending import Outcome, SendContext

log = logging.getLogger(__name__)


def idempotency_key(kind: str, owner: int, part: int, ids: list[int]) -> str:
    digest = hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()[:16]
    return f"mailgenius-{kind}{owner}-b{part}-{digest}"


def backoff(attempt: int) -> float:
    return min(config.BACKOFF_MAX, config.BACKOFF_BASE * (2 ** (attempt - 1)))



async def _deliver(ctx: SendContext, conn, campaign_id: int | None, emails: list[OutEmail],
                   key_kind: str, owner: int, part: int, outcome: Outcome) -> None:
    """Send with retries (5xx, timeouts, 429 + Retry-After), recording after every call."""
    from .sending import _record  # at call time: sending imports this module
    provider = await ctx.provider(conn)
    pending = emails
    attempt = 0
    while pending:
        attempt += 1
        if float((await ctx.settings_cache.get(conn)).get("rate_limit") or 0) > 0:  # re-read every second
            await ctx.limiter.acquire(len(pending))
        pause = ctx.provider_pause_until - time.monotonic()
        if pause > 0:  # another batch of this process was told to back off (429 Retry-After)
            await asyncio.sleep(pause)
        key = idempotency_key(key_kind, owner, part, [e.message_id for e in pending])
        try:
            result = await provider.send_batch(pending, key)
        except Exception as exc:  # a bug or an unexpected library error: retry like a 5xx
            log.exception("provider call raised")
            result = SendResult(retry=[e.message_id for e in pending],
                                error=ProviderError("server_error", f"{type(exc).__name__}: {exc}"[:500], True))
        retry_ids = set(result.retry)
        exhausted = bool(retry_ids) and attempt >= config.MAX_ATTEMPTS
        failed = dict(result.rejected)
        if exhausted:
            err = result.error or ProviderError("server_error", "retries exhausted", True)
            for i in retry_ids:
                failed[i] = (err.reason, f"after {attempt} attempts: {err.message}"[:500])
        await _record(ctx, conn, provider.name, campaign_id, result.accepted, failed, [], outcome)
        if not retry_ids or exhausted:
            return
        err = result.error
        delay = backoff(attempt)
        if err is not None and err.retry_after is not None:
            delay = min(err.retry_after, config.RETRY_AFTER_MAX)
            if err.reason == "rate_limited":
                ctx.provider_pause_until = max(ctx.provider_pause_until, time.monotonic() + delay)
        log.warning("provider call to retry", extra={"campaign_id": campaign_id, "attempt": attempt,
                                                     "reason": err.reason if err else "", "delay": delay,
                                                     "error": err.message if err else ""})
        await asyncio.sleep(delay)
        pending = [e for e in pending if e.message_id in retry_ids]
