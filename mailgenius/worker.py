"""Helpers for dramatiq worker processes.

Actor modules call :func:`worker_setup` at import (it reads settings, configures JSON logs and
the broker with the AsyncIO and Prometheus middleware), then declare ``async def`` actors that
get their Postgres pool and Redis client from :func:`resources` — created lazily inside
dramatiq's event-loop thread, one set per worker process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import dramatiq
import redis.asyncio as aioredis

from .broker import setup_broker
from .cache import create_redis
from .logs import setup_logging
from .settings import Settings, in_worker_process, load_settings


@dataclass
class Resources:
    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis


_resources: dict[int, Resources] = {}
_lock = asyncio.Lock


def worker_setup(service: str) -> tuple[Settings, dramatiq.Broker]:
    """Load the settings (once per worker process: the actor module keeps them and hands them,
    with their ``sender`` / ``importer`` parts, to everything it runs), set up logs and the broker.
    A bad value raises SettingsError naming the variable (`mailgenius worker` checks them first)."""
    settings = load_settings()
    setup_logging(f"{service}-worker", settings.log_level)
    in_worker = in_worker_process()
    if in_worker:  # WARNING+ to the capped Redis stream (not in test processes importing actors)
        from .logstream import attach_log_stream

        attach_log_stream(settings, f"{service}-worker")
    broker = setup_broker(settings, worker=in_worker)
    return settings, broker


async def resources(settings: Settings) -> Resources:
    """The per-process (per event loop) pool and Redis client, created on first use."""
    loop = asyncio.get_running_loop()
    res = _resources.get(id(loop))
    if res is None:
        pool = await asyncpg.create_pool(
            settings.database_url, min_size=1, max_size=settings.db_pool_max, command_timeout=300,
        )
        res = Resources(settings, pool, create_redis(settings.redis_url))
        _resources[id(loop)] = res
    return res


def enqueue(broker: dramatiq.Broker, queue: str, actor: str, *args, delay_ms: int | None = None,
            **options) -> dramatiq.Message:
    """Enqueue by name, so API processes need not import (and bind) the actor modules."""
    broker.declare_queue(queue)
    message = dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options=options)
    return broker.enqueue(message, delay=delay_ms)
