"""Queue depth and worker liveness, shared by every service's health checks and the exporter.

Workers announce themselves with :class:`mailgenius.heartbeat.WorkerHeartbeat` (a dramatiq middleware): every
``interval`` seconds each worker process writes ``<host>:<pid>`` with the current time into the
sorted set ``<prefix>:workers:<queue>`` of each queue it consumes. A worker is alive while its
last beat is younger than ``STALE_AFTER``. This works the same for the Redis and RabbitMQ
brokers, since the heartbeats live in Redis (our cache), not in the broker.

Depths for the Redis broker come from dramatiq's own keys (see dramatiq/brokers/redis/dispatch.lua):
``<ns>:<queue>`` (list of waiting ids), ``<ns>:<queue>.DQ`` (delayed), ``<ns>:<queue>.XQ``
(dead-lettered, a sorted set), with message bodies in the ``.msgs`` hashes. On RabbitMQ
(``BROKER_URL=amqp://``) they come from passive ``queue.declare`` of ``<queue>``, ``<queue>.DQ``
and ``<queue>.XQ`` (:func:`rabbitmq_queue_stats`; no head age there).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from . import contract
from .broker import dramatiq_namespace
from .health import DEGRADED, HEALTHY, UNHEALTHY, CheckResult

# the heartbeat lives beside the broker; its names stay importable from here
from .heartbeat import HEARTBEAT_INTERVAL, STALE_AFTER, WorkerHeartbeat, workers_key  # noqa: F401


async def worker_count(redis, prefix: str, queue: str, *, stale_after: float = STALE_AFTER) -> int:
    return int(await redis.zcount(workers_key(prefix, queue), time.time() - stale_after, "+inf"))


@dataclass
class QueueStats:
    waiting: int = 0
    delayed: int = 0
    dead: int = 0
    #: None when the broker cannot tell (RabbitMQ)
    oldest_age_seconds: float | None = 0.0


async def redis_queue_stats(redis, namespace: str, queue: str) -> QueueStats:
    """Depths of one dramatiq queue on the Redis broker (``redis`` is an asyncio client)."""
    base = f"{namespace}:{queue}"
    pipe = redis.pipeline(transaction=False)
    pipe.llen(base)
    pipe.llen(f"{base}.DQ")
    pipe.zcard(f"{base}.XQ")
    pipe.lindex(base, 0)
    waiting, delayed, dead, oldest_id = await pipe.execute()
    age = 0.0
    if oldest_id is not None:
        raw = await redis.hget(f"{base}.msgs", oldest_id)
        if raw:
            try:
                ts_ms = json.loads(raw)["message_timestamp"]
                age = max(0.0, time.time() - ts_ms / 1000.0)
            except (ValueError, KeyError, TypeError):
                age = 0.0
    return QueueStats(int(waiting), int(delayed), int(dead), age)


def rabbitmq_connect(url: str):
    """A blocking pika connection that gives up within seconds (health checks, scrapes)."""
    import pika

    params = pika.URLParameters(url)
    params.socket_timeout = 2
    params.blocked_connection_timeout = 2
    params.connection_attempts = 1
    return pika.BlockingConnection(params)


def rabbitmq_ready_count(conn, name: str) -> int:
    """Ready messages of one RabbitMQ queue (passive declare on a pika connection); 0 when the
    queue does not exist (yet)."""
    import pika.exceptions

    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=name, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return 0
        raise
    finally:
        if channel.is_open:
            channel.close()


def rabbitmq_queue_stats(url: str, queue: str) -> QueueStats:
    """Depths of one dramatiq queue on RabbitMQ (blocking: call it in a thread): ready messages of
    ``<queue>``, ``<queue>.DQ`` and ``<queue>.XQ`` by passive ``queue.declare`` (0 for a queue not
    declared yet). RabbitMQ cannot tell the age of a queue's head without consuming it: None."""
    conn = rabbitmq_connect(url)
    try:
        return QueueStats(rabbitmq_ready_count(conn, queue), rabbitmq_ready_count(conn, f"{queue}.DQ"),
                          rabbitmq_ready_count(conn, f"{queue}.XQ"), None)
    finally:
        conn.close()


async def broker_queue_stats(settings, redis, queue: str) -> QueueStats:
    """Depths from whichever broker ``settings.broker_url`` names."""
    if settings.broker_kind == "rabbitmq":
        return await asyncio.to_thread(rabbitmq_queue_stats, settings.broker_url, queue)
    return await redis_queue_stats(redis, dramatiq_namespace(settings), queue)


def waiting_status(waiting: int, max_waiting: float | None = None) -> str:
    """A queue's depth: degraded when more than ``max_waiting`` wait (default: QueueDepthHigh's
    threshold ``queue_waiting_messages`` of the contract)."""
    if max_waiting is None:
        max_waiting = contract.get().threshold("queue_waiting_messages")
    return DEGRADED if waiting > max_waiting else HEALTHY


def workers_status(workers: int, waiting: int) -> str:
    """A queue's workers: unhealthy when messages wait and no worker is alive, degraded when no
    worker is alive and nothing waits."""
    if workers > 0:
        return HEALTHY
    return UNHEALTHY if waiting else DEGRADED


def queue_check(get_redis, settings, queue: str, *, max_waiting: float | None = None):
    """Health check: the broker answers; :func:`waiting_status` of its depth."""
    if max_waiting is None:
        max_waiting = contract.get().threshold("queue_waiting_messages")

    async def check():
        if settings.broker_kind != "redis":
            await get_redis().ping()  # the heartbeats live in Redis whatever the broker
        stats = await broker_queue_stats(settings, get_redis(), queue)
        detail = f"{queue}: {stats.waiting} waiting, {stats.delayed} delayed, {stats.dead} dead"
        if waiting_status(stats.waiting, max_waiting) != HEALTHY:
            return CheckResult(DEGRADED, detail)
        return detail

    return check


def workers_check(get_redis, settings, queue: str):
    """Health check: :func:`workers_status` of the queue's live workers."""

    async def check():
        redis = get_redis()
        n = await worker_count(redis, settings.redis_prefix, queue)
        if n > 0:
            return f"{n} worker process(es) on {queue}"
        waiting = (await broker_queue_stats(settings, redis, queue)).waiting
        if workers_status(n, waiting) == UNHEALTHY:
            return CheckResult(UNHEALTHY, f"no live worker on {queue} and {waiting} message(s) waiting")
        return CheckResult(DEGRADED, f"no live worker on {queue}")

    return check
