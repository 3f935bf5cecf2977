"""API keys: created by ``mailgenius apikey create``, stored as sha256 hashes, revocable.

A key looks like ``mg_<8-char prefix>_<43-char secret>``. Reads take any valid key; writes take
the scope of their area (``send``, ``import``, ``admin``); ``admin`` implies every scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time

import asyncpg

from .health import consume_outcome

#: every scope a key may hold
SCOPES = ("read", "send", "import", "admin")
#: seconds the in-process copy of the active keys is trusted without asking Postgres again
#: (bounds how late a revocation takes effect)
AUTH_CACHE_TTL = 5.0
#: an unknown key makes the copy reload, but at most this often (seconds): random Bearer tokens
#: cost at most 1/AUTH_RELOAD_MIN_INTERVAL queries a second per process, whatever their rate
AUTH_RELOAD_MIN_INTERVAL = 0.1
#: digests known to be no key (the negative cache); emptied alone when it grows past this, so a
#: flood of bogus tokens never evicts the valid keys
AUTH_NEGATIVE_MAX = 10_000
#: the cache dict's entry holding the copy (a str key: the dict holds nothing else of ours)
_STATE = "\x00active-keys"
#: the shape of every key we issue; anything else is refused without any lookup
KEY_RE = re.compile(r"mg_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


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
    """The scopes of a valid, unrevoked key, or None. A string that is not shaped like one of
    our keys is refused without a lookup."""
    if not KEY_RE.fullmatch(key):
        return None
    return await lookup_hash(pool, hash_key(key), cache)


class _Active:
    """The in-process copy of the active keys: sha256 digest -> scopes (a few hundred rows at
    most), with the single load in flight."""

    __slots__ = ("loaded_at", "keys", "unknown", "task")

    def __init__(self):
        self.loaded_at = -float("inf")
        self.keys: dict[str, frozenset[str]] = {}
        #: digests a load that started after they first arrived did not find: no key, ever
        #: (a key is never used before it is created); answered from here without a query
        self.unknown: set[str] = set()
        self.task: asyncio.Future | None = None


async def lookup_hash(pool: asyncpg.Pool, digest: str, cache: dict) -> frozenset[str] | None:
    """The scopes of the valid, unrevoked key with this sha256 digest, or None.

    Answered from an in-process copy of the active keys, reloaded (one query, shared by every
    request waiting for it) when it is older than :data:`AUTH_CACHE_TTL` (the bound on how late
    a revocation takes effect), or when a digest it does not hold arrives, then at most once per
    :data:`AUTH_RELOAD_MIN_INTERVAL` (concurrent unknown tokens share that one reload). A token
    once found unknown is then answered from memory (the negative cache). So a flood of random
    Bearer tokens costs at most 1/AUTH_RELOAD_MIN_INTERVAL queries a second per process, not one
    per token, and never evicts a valid key; a key created a moment ago is still found (the
    reload that answers a request always starts after the request arrived)."""
    state = cache.get(_STATE)
    if state is None:
        state = cache[_STATE] = _Active()
    asked = time.monotonic()
    if asked - state.loaded_at < AUTH_CACHE_TTL:
        scopes = state.keys.get(digest)
        if scopes is not None:
            return scopes
        if digest in state.unknown:
            return None
        delay = state.loaded_at + AUTH_RELOAD_MIN_INTERVAL - asked  # unknown: throttled reload
    else:
        delay = 0.0  # stale: reload now
    # a load that started after this request arrived has seen every key committed before it
    while state.loaded_at < asked:
        task = state.task
        if task is None:
            task = state.task = asyncio.ensure_future(_load(pool, state, max(delay, 0.0)))
            task.add_done_callback(consume_outcome)
        # shielded: a caller that goes away does not cancel the load the others wait for
        await asyncio.shield(task)
    scopes = state.keys.get(digest)
    if scopes is None:
        if len(state.unknown) >= AUTH_NEGATIVE_MAX:
            state.unknown.clear()
        state.unknown.add(digest)
    return scopes


async def _load(pool: asyncpg.Pool, state: _Active, delay: float) -> None:
    try:
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.monotonic()  # the copy is as old as the moment the query was sent
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT key_hash, scopes FROM api_keys WHERE revoked_at IS NULL")
            mark = getattr(conn, "mark_clean", None)  # one plain SELECT: no reset round trip
            if mark is not None:
                mark()
        state.keys = {r["key_hash"]: frozenset(r["scopes"]) for r in rows}
        state.loaded_at = started
    finally:
        state.task = None


def allows(scopes: frozenset[str], needed: str | None) -> bool:
    if needed is None or needed == "read":
        return True
    return "admin" in scopes or needed in scopes
