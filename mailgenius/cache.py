"""Redis client lifecycle. Short socket timeouts: when Redis is unreachable a request fails
within a second (503 JSON), it never hangs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis

#: seconds to connect / to wait for a reply before giving up
REDIS_CONNECT_TIMEOUT = 1.0
REDIS_SOCKET_TIMEOUT = 2.0


def create_redis(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        health_check_interval=15,
        retry_on_timeout=False,
        decode_responses=False,
    )


def redis_ctx(settings, key):
    """aiohttp cleanup_ctx for one Redis client."""

    async def ctx(app) -> AsyncIterator[None]:
        client = create_redis(settings.redis_url)
        app[key] = client
        try:
            yield
        finally:
            await client.aclose()

    return ctx


def rkey(settings, *parts: str) -> str:
    """A Redis key under our prefix (tests isolate by changing the prefix)."""
    return ":".join((settings.redis_prefix, *parts))
