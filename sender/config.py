"""Tunables of the sender that are not part of the deployment contract (settings.py holds
those). Each may be overridden by an environment variable of the same name prefixed with
``MAILGENIUS_SENDER_``; tests use that to shorten back-offs."""

from __future__ import annotations

import os


def _num(name: str, default: float, *, env: str | None = None) -> float:
    var = env or f"MAILGENIUS_SENDER_{name}"
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"mailgenius: {var}: expected a number, got {raw!r}") from None


#: recipients per dramatiq message and per provider call (Resend's batch endpoint takes <= 100)
BATCH_SIZE = 100
#: quick provider attempts inside one delivery of a batch (5xx, timeout, connection, 429); after
#: the last one the batch goes back to dramatiq (sender.delivery.ProviderUnavailable) so no
#: worker thread sits out a long outage. Lower it to hand back sooner, raise it to ride out blips
#: in-process.
MAX_ATTEMPTS = int(_num("MAX_ATTEMPTS", 3))
#: first back-off between those quick attempts (5xx / timeout), seconds; doubles each attempt up
#: to BACKOFF_MAX
BACKOFF_BASE = _num("BACKOFF_BASE", 0.5)
BACKOFF_MAX = _num("BACKOFF_MAX", 30.0)
#: total time a recipient may keep failing with retryable provider errors, measured in Postgres
#: from its first failed call (messages.retry_since, so it survives redeliveries and worker
#: restarts), before it is marked ``failed`` with the last error (``retry-failed`` requeues it).
#: Env ``MAILGENIUS_SEND_RETRY_BUDGET`` (the issue's name). Raise it to ride out longer provider
#: outages; lower it to surface failures to the campaign sooner. Seconds.
SEND_RETRY_BUDGET = _num("SEND_RETRY_BUDGET", 900.0, env="MAILGENIUS_SEND_RETRY_BUDGET")
#: dramatiq retries of a send actor for errors other than a provider outage (Postgres down, a bug)
ACTOR_MAX_RETRIES = int(_num("ACTOR_MAX_RETRIES", 20))
#: delay before dramatiq redelivers a batch handed back during a provider outage: half the time
#: the batch has been failing, between these bounds (plus up to 20 % jitter), seconds. The upper
#: bound (with jitter) stays below STALL_SECONDS, so the sweeper never mistakes a retrying
#: campaign for a stalled one.
REDELIVERY_MIN = _num("REDELIVERY_MIN", 2.0)
REDELIVERY_MAX = _num("REDELIVERY_MAX", 30.0)
#: the longest Retry-After we honour before retrying anyway, seconds
RETRY_AFTER_MAX = _num("RETRY_AFTER_MAX", 60.0)
#: one provider HTTP call / SMTP conversation, seconds
PROVIDER_TIMEOUT = _num("PROVIDER_TIMEOUT", 30.0)
#: SMTP connections a worker process keeps open to its relay, at most (idle or in use): the
#: relay sees at most processes x this many connections from the fleet (Postfix's default limit
#: per client is 50)
SMTP_POOL_SIZE = int(_num("SMTP_POOL_SIZE", 16))
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
#: STARTTLS when the relay offers it (opportunistic, like Postfix's "may"; MAILGENIUS_SMTP_STARTTLS
#: makes it required). 0 turns it off.
SMTP_OPPORTUNISTIC_TLS = bool(_num("SMTP_OPPORTUNISTIC_TLS", 1))
#: verify the relay's certificate on opportunistic STARTTLS (required STARTTLS always verifies)
SMTP_TLS_VERIFY = bool(_num("SMTP_TLS_VERIFY", 0))
#: attempts to record a relay's answers while Postgres is unreachable, spaced by this many seconds
#: (doubling up to 5 s), within SEND_RETRY_BUDGET; then the answers go to the local journal
RECORD_RETRY_BASE = _num("RECORD_RETRY_BASE", 0.2)
