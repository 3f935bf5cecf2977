"""API keys: created by ``mailgenius apikey create``, stored as sha256 hashes, revocable.

A key looks like ``mg_<8-char prefix>_<43-char secret>``. Reads take any valid key; writes take
the scope of their area (``send``, ``import``, ``admin``); ``admin`` implies every scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time

import asyncpg

from .db import fetchrow_read
from .health import consume_outcome

#: every scope a key may hold
SCOPES = ("read", "send", "import", "admin")
#: seconds a verified key is trusted without asking Postgres again (bounds revocation delay)
AUTH_CACHE_TTL = 5.0
#: cache entries above which the cache is emptied (bogus keys must not grow it without bound)
AUTH_CACHE_MAX = 10_000
#: marks the in-flight lookups kept in the cache dict beside the entries
_PENDING = object()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    prefix = secrets.token_hex(4)
    return prefix, f"mg_{prefix}_{secrets.token_urlsafe(32)}"


def parse_scopes(raw: str) -> list[str]:
    scopes = sorted({s.strip() for s in raw.split(",") if s.strip()})
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scope(s) {', '.join(bad)}; choose from {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError("at least one scope is needed")
    return scopes


async def create_key(conn, scopes: list[str], name: str = "") -> tuple[int, str]:
    prefix, key = new_key()
    key_id = await conn.fetchval(
        "INSERT INTO api_keys (prefix, key_hash, name, scopes) VALUES ($1, $2, $3, $4) RETURNING id",
        prefix, hash_key(key), name, scopes,
    )
    return key_id, key


async def revoke_key(conn, prefix_or_id: str) -> bool:
    if prefix_or_id.isdigit():
        row = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id",
            int(prefix_or_id),
        )
    else:
        prefix = prefix_or_id.split("_")[1] if prefix_or_id.startswith("mg_") else prefix_or_id
        row = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL RETURNING id",
            prefix,
        )
    return row is not None


async def lookup(pool: asyncpg.Pool, key: str, cache: dict) -> frozenset[str] | None:
    """The scopes of a valid, unrevoked key, or None."""
    return await lookup_hash(pool, hash_key(key), cache)


async def lookup_hash(pool: asyncpg.Pool, digest: str, cache: dict) -> frozenset[str] | None:
    """The scopes of the valid, unrevoked key with this sha256 digest, or None; trusted for
    :data:`AUTH_CACHE_TTL` seconds (the bound on how late a revocation takes effect)."""
    now = time.monotonic()
    hit = cache.get(digest)
    if hit and hit[0] > now:
        return hit[1]
    # single flight: when the entry of a key in heavy use expires, the requests arriving during
    # the round trip share one query instead of each taking a pool connection for the same row
    pending = (_PENDING, digest)
    task = cache.get(pending)
    if task is None:
        task = asyncio.ensure_future(_fetch(pool, digest, cache, pending))
        task.add_done_callback(consume_outcome)
        cache[pending] = task
    # shielded: a caller that goes away does not cancel the lookup the others wait for
    return await asyncio.shield(task)


async def _fetch(pool: asyncpg.Pool, digest: str, cache: dict, pending: tuple) -> frozenset[str] | None:
    try:
        started = time.monotonic()  # the answer is as old as the moment the query was sent
        row = await fetchrow_read(
            pool, "SELECT scopes FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", digest
        )
        scopes = frozenset(row["scopes"]) if row else None
        if len(cache) > AUTH_CACHE_MAX:
            cache.clear()
        cache[digest] = (started + AUTH_CACHE_TTL, scopes)
        return scopes
    finally:
        if cache.get(pending) is asyncio.current_task():
            del cache[pending]


def allows(scopes: frozenset[str], needed: str | None) -> bool:
    if needed is None or needed == "read":
        return True
    return "admin" in scopes or needed in scopes
