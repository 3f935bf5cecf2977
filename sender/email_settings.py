"""Run-time email settings (provider, rate limit) and the fleet-wide rate limiter.

The settings table (key ``email``) is the source of truth; the Redis hash
``<prefix>:sender:email`` mirrors it for workers. The rate limiter is a GCRA kept in Redis
(``<prefix>:sender:ratelimit``): the Lua script reads ``rate_limit`` from the hash on every call,
so a ``PUT /api/settings/email`` applies to every worker on every host at their next batch
(workers waiting for a slot re-check at least every second).
"""

from __future__ import annotations

import asyncio
import json
import time

import redis.exceptions

from mailgenius.cache import rkey
from mailgenius.errors import ValidationError

PROVIDERS = ("resend", "smtp")
#: errors meaning "Redis is unreachable right now"
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
#: settings-table key
SETTINGS_KEY = "email"
#: the highest rate limit accepted (emails per second); 0 means unlimited
MAX_RATE_LIMIT = 1_000_000
#: a batch may start this much before its slot (compensates for sleep overshoot), seconds
RATE_TOLERANCE = 0.005
#: a slot taken up to this late does not push the schedule back, seconds
RATE_CATCH_UP = 0.25
#: longest single sleep while waiting for a slot, so rate changes apply quickly, seconds
MAX_WAIT_STEP = 1.0

# KEYS[1] settings hash, KEYS[2] GCRA "theoretical arrival time";
# ARGV[1] emails, ARGV[2] tolerance, ARGV[3] lateness kept in the schedule (seconds)
_GCRA = """
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate_limit') or '0') or 0
if rate <= 0 then return '0' end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
-- a slot taken a little late keeps its place in the schedule (no drift below the rate);
-- after an idle spell the schedule restarts from now (no burst above it)
if tat < now - tonumber(ARGV[3]) then tat = now end
local wait = tat - now
if wait > tonumber(ARGV[2]) then return tostring(wait) end
local new_tat = tat + n / rate
redis.call('SET', KEYS[2], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 60000)
return '0'
"""


def hash_key(settings) -> str:
    return rkey(settings, "sender", "email")


def tat_key(settings) -> str:
    return rkey(settings, "sender", "ratelimit")


def defaults(settings) -> dict:
    return {"provider": settings.email_provider, "rate_limit": 0}


def validate(body, settings, current: dict) -> dict:
    if not isinstance(body, dict):
        raise ValidationError("expected a JSON object {\"provider\", \"rate_limit\"}")
    unknown = set(body) - {"provider", "rate_limit"}
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(sorted(unknown))}")
    out = dict(current)
    if "provider" in body:
        p = body["provider"]
        if p not in PROVIDERS:
            raise ValidationError(f"provider must be one of {', '.join(PROVIDERS)}")
        if p == "resend" and not settings.resend_api_key:
            raise ValidationError("provider resend needs RESEND_API_KEY to be set", code="provider_not_configured")
        out["provider"] = p
    if "rate_limit" in body:
        r = body["rate_limit"]
        if isinstance(r, bool) or not isinstance(r, int | float) or r != r or r < 0 or r > MAX_RATE_LIMIT:
            raise ValidationError(f"rate_limit must be a number of emails per second between 0 "
                                  f"(unlimited) and {MAX_RATE_LIMIT}")
        out["rate_limit"] = int(r) if float(r).is_integer() else float(r)
    return out


async def load(pool, settings) -> dict:
    raw = await pool.fetchval("SELECT value FROM settings WHERE key = $1", SETTINGS_KEY)
    out = defaults(settings)
    if raw:
        out.update(json.loads(raw))
    return out


async def mirror(redis, settings, values: dict) -> None:
    await redis.hset(hash_key(settings), mapping={"provider": values["provider"],
                                                  "rate_limit": str(values["rate_limit"])})


async def save(pool, redis, settings, values: dict) -> None:
    await pool.execute(
        """INSERT INTO settings (key, value, updated_at) VALUES ($1, $2::jsonb, now())
           ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()""",
        SETTINGS_KEY, json.dumps(values),
    )
    await mirror(redis, settings, values)
    # a new rate starts from now: no worker keeps waiting on slots computed at the old rate
    await redis.delete(tat_key(settings))


class RateLimiter:
    def __init__(self, redis, settings):
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(_GCRA)
        self.keys = [hash_key(settings), tat_key(settings)]

    async def acquire(self, n: int) -> float:
        """Wait for a slot for ``n`` emails; returns the seconds waited. While Redis is
        unreachable it keeps waiting (sending unmetered could break the provider's limit), up to
        ``settings.sender.redis_patience`` seconds, then raises."""
        waited = 0.0
        down_since = None
        while True:
            try:
                wait = float(await self._script(keys=self.keys, args=[n, RATE_TOLERANCE, RATE_CATCH_UP]))
            except REDIS_ERRORS:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.settings.sender.redis_patience:
                    raise
                await asyncio.sleep(1.0)
                waited += 1.0
                continue
            down_since = None
            if wait <= 0:
                return waited
            step = min(wait, MAX_WAIT_STEP)
            await asyncio.sleep(step)
            waited += step


class SettingsCache:
    """A worker's view of the email settings: the Redis mirror, re-read at most every
    ``settings.sender.settings_cache_seconds``; falls back to the table, then to the environment's defaults."""

    def __init__(self, redis, pool, settings):
        self.redis, self.pool, self.settings = redis, pool, settings
        self._value: dict | None = None
        self._at = 0.0
        # one refresh at a time
        self._lock = asyncio.Lock()

    async def get(self, conn=None) -> dict:
        """``conn``: a connection the caller already holds, used for the table fallback (a
        second connection from a pool that callers have exhausted would never come)."""
        if self._value is not None and time.monotonic() - self._at < self.settings.sender.settings_cache_seconds:
            return self._value
        async with self._lock:
            if self._value is not None and time.monotonic() - self._at < self.settings.sender.settings_cache_seconds:
                return self._value
            return await self._refresh(conn)

    async def _refresh(self, conn) -> dict:
        now = time.monotonic()
        try:
            raw = await self.redis.hgetall(hash_key(self.settings))
        except REDIS_ERRORS:
            raw = None
            if self._value is not None:  # Redis is down: keep what we knew, ask again later
                self._at = now
                return self._value
        if raw:
            value = {k.decode(): v.decode() for k, v in raw.items()}
            value["rate_limit"] = float(value.get("rate_limit", 0) or 0)
        else:
            value = await load(conn if conn is not None else self.pool, self.settings)
            if raw is not None:
                await mirror(self.redis, self.settings, value)
        self._value, self._at = value, now
        return value
