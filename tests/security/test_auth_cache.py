"""API key lookups: random Bearer tokens are answered from memory (a negative cache and one
shared, throttled reload of the active keys), never one Postgres query each, and never evict a
valid key; keys created a moment ago still work, revocations still take effect."""

from __future__ import annotations

import asyncio
import secrets
import time

from mailgenius import auth
from tests.conftest import bearer


def random_token() -> str:
    return f"mg_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


class CountingPool:
    def __init__(self, pool):
        self.pool, self.acquired = pool, 0

    def acquire(self, *a, **kw):
        self.acquired += 1
        return self.pool.acquire(*a, **kw)


async def test_random_tokens_do_not_each_cost_a_query_nor_evict_valid_keys(pool, make_key, monkeypatch):
    # Given a valid key, looked up once
    monkeypatch.setattr(auth, "AUTH_NEGATIVE_MAX", 300, raising=False)
    key = await make_key("send")
    counting, cache = CountingPool(pool), {}
    assert await auth.lookup(counting, key, cache) == frozenset({"send"})
    # When 2,000 random well-formed tokens arrive, in bursts of 200 (a flood of guesses),
    started = time.monotonic()
    before = counting.acquired
    for _ in range(10):
        results = await asyncio.gather(*(auth.lookup(counting, random_token(), cache) for _ in range(200)))
        assert results == [None] * 200
    queries = counting.acquired - before
    elapsed = time.monotonic() - started
    # Then Postgres was asked at most once per reload interval, not once per token
    assert queries <= 1 + elapsed / auth.AUTH_RELOAD_MIN_INTERVAL + 1, (queries, elapsed)
    assert queries <= 15, queries
    # And a token already refused is refused from memory
    bogus = random_token()
    assert await auth.lookup(counting, bogus, cache) is None
    n = counting.acquired
    assert [await auth.lookup(counting, bogus, cache) for _ in range(50)] == [None] * 50
    assert counting.acquired == n
    # And the valid key is still answered without a query (the flood evicted nothing)
    n = counting.acquired
    assert await auth.lookup(counting, key, cache) == frozenset({"send"})
    assert counting.acquired == n


async def test_malformed_tokens_are_refused_without_a_lookup(pool):
    counting, cache = CountingPool(pool), {}
    for token in ("x", "mg_nope_" + "x" * 43, "Bearer", "mg_0123abcd_short", "a" * 5000):
        assert await auth.lookup(counting, token, cache) is None
    assert counting.acquired == 0


async def test_a_key_created_just_after_a_reload_is_found(pool, make_key):
    cache = {}
    first = await make_key("read")
    assert await auth.lookup(pool, first, cache) == frozenset({"read"})
    fresh = await make_key("import")  # created right after the copy was loaded
    assert await auth.lookup(pool, fresh, cache) == frozenset({"import"})


async def test_random_bearer_tokens_against_a_service_are_401(client_for, make_key):
    _app, client = await client_for("importer")
    key = await make_key("read")
    resps = await asyncio.gather(*(client.get("/api/imports", headers=bearer(random_token())) for _ in range(50)))
    assert {r.status for r in resps} == {401}
    assert (await client.get("/api/imports", headers=bearer(key))).status == 200
