"""Tunables of the sender that are not part of the deployment contract (settings.py holds
those). Each may be overridden by an environment variable of the same name prefixed with
``MAILGENIUS_SENDER_``; tests use that to shorten back-offs."""

from __future__ import annotations

import os


def _num(name: str, default: float) -> float:
    raw = os.environ.get(f"MAILGENIUS_SENDER_{name}")
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"mailgenius: MAILGENIUS_SENDER_{name}: expected a number, got {raw!r}") from None


#: recipients per dramatiq message and per provider call (Resend's batch endpoint takes <= 100)
BATCH_SIZE = 100
#: provider attempts per batch before its recipients are marked failed
MAX_ATTEMPTS = int(_num("MAX_ATTEMPTS", 5))
#: first back-off after a 5xx / timeout, seconds; doubles each attempt up to BACKOFF_MAX
BACKOFF_BASE = _num("BACKOFF_BASE", 0.5)
BACKOFF_MAX = _num("BACKOFF_MAX", 30.0)
#: the longest Retry-After we honour before retrying anyway, seconds
RETRY_AFTER_MAX = _num("RETRY_AFTER_MAX", 60.0)
#: one provider HTTP call / SMTP conversation, seconds
PROVIDER_TIMEOUT = _num("PROVIDER_TIMEOUT", 30.0)
#: SMTP connections kept open per worker process
SMTP_POOL_SIZE = int(_num("SMTP_POOL_SIZE", 4))
#: seconds a worker trusts its cached copy of the email settings (provider)
SETTINGS_CACHE_SECONDS = _num("SETTINGS_CACHE_SECONDS", 1.0)
#: window of the "recent failure ratio" of the email health check, minutes
HEALTH_WINDOW_MINUTES = int(_num("HEALTH_WINDOW_MINUTES", 5))
#: failure ratio above which the email check reports degraded
HEALTH_FAILURE_RATIO = _num("HEALTH_FAILURE_RATIO", 0.05)
#: seconds a batch waits for Redis (rate limit) to come back before giving up (dramatiq retries)
REDIS_PATIENCE = _num("REDIS_PATIENCE", 300.0)
#: the stalled-campaign sweeper (sender/sweeper.py): how often it looks, seconds
SWEEP_INTERVAL = _num("SWEEP_INTERVAL", 10.0)
#: a sending campaign with unsent recipients, no batch in progress and no progress for this
#: long is re-dispatched (its dramatiq messages were lost, e.g. in a Redis outage), seconds
STALL_SECONDS = _num("STALL_SECONDS", 45.0)
#: a queued campaign whose ledger is not written after this long is re-dispatched, seconds
QUEUED_STALL_SECONDS = _num("QUEUED_STALL_SECONDS", 120.0)
#: the sweeper stays quiet while more messages than this wait in the queue (they may simply
#: be the stalled campaign's turn coming)
SWEEP_MAX_WAITING = int(_num("SWEEP_MAX_WAITING", 100))
