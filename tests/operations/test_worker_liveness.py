"""Live-worker counts drop within seconds of a worker's death: a heartbeat removes the beats of
this host's worker processes that no longer exist (killed with -9: no shutdown hook ran), and a
beat older than STALE_AFTER (10 s, well inside the issue's 15 s) never counts."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time

import redis as syncredis
import redis.asyncio as aioredis

from mailgenius.queues import (
    HEARTBEAT_INTERVAL,
    STALE_AFTER,
    WorkerHeartbeat,
    worker_count,
    workers_key,
)
from tests.stack import wait_until

QUEUE = "email-sending"


def _count(settings) -> int:
    async def run():
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await worker_count(client, settings.redis_prefix, QUEUE)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_killed_workers_beat_is_removed_at_the_next_beat_of_a_live_one(settings):
    assert STALE_AFTER + HEARTBEAT_INTERVAL <= 15  # a death stops counting within 15 s at worst
    key = workers_key(settings.redis_prefix, QUEUE)
    client = syncredis.Redis.from_url(settings.redis_url)
    # Given a worker process on this host that beat just now and was then killed with -9
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    member = f"{socket.gethostname()}:{dead.pid}"
    client.zadd(key, {member: time.time()})
    # and one on another host (its pid means nothing here: only staleness removes it)
    client.zadd(key, {"elsewhere:1": time.time()})
    assert _count(settings) == 2
    # When a live worker of this host beats
    beat = WorkerHeartbeat(redis_url=settings.redis_url, prefix=settings.redis_prefix, interval=0.2)
    beat._queues = {QUEUE}
    thread = threading.Thread(target=beat._run, daemon=True)
    thread.start()
    try:
        # Then the dead one no longer counts (the live one does), the other host's is kept
        wait_until(lambda: client.zscore(key, member) is None, 5, what="the dead worker's beat removed")
        assert client.zscore(key, "elsewhere:1") is not None
        assert _count(settings) == 2  # the live beat and the other host's
    finally:
        beat._stop.set()
        thread.join(5)
        client.delete(key)
        client.close()
