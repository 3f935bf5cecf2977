"""Queue depths and queue admin on a real RabbitMQ broker (BROKER_URL=amqp://).

Queue names are unique per test (RabbitMQ has no key prefix like our Redis namespace), so other
suites running on the same RabbitMQ are never touched; the queues are deleted afterwards."""

from __future__ import annotations

import os
import socket
import time
import uuid

import dramatiq
import pytest
from dramatiq import Worker

from exporter.brokers import queue_admin, queue_stats
from mailgenius.worker import enqueue
from tests.conftest import unavailable

AMQP_URL = os.environ.get("MAILGENIUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def rabbit(exporter_settings):
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        unavailable("RabbitMQ at 127.0.0.1:5672")
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=AMQP_URL, confirm_delivery=True)
    queue = f"mgtest-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    yield broker, queue, exporter_settings.replace(broker_url=AMQP_URL)
    channel = broker.channel
    for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
        channel.queue_delete(name)
    broker.close()


async def wait_depth(settings, queue, **expected):
    deadline = time.monotonic() + 10
    while True:
        st = await queue_stats(settings, None, queue)
        got = {k: getattr(st, k) for k in expected}
        if got == expected or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


async def test_rabbitmq_depths_and_admin_touch_exactly_the_selected_messages(rabbit):
    broker, queue, settings = rabbit

    # Given 3 real dead letters (an always-failing actor, no retries), then 5 waiting and 2
    # delayed messages with no worker running
    def always_fails(i):
        raise RuntimeError("rejected")

    actor = dramatiq.actor(always_fails, broker=broker, queue_name=queue, max_retries=0,
                           actor_name=f"fails_{queue.replace('-', '_')}")
    for i in range(3):
        actor.send(i)
    worker = Worker(broker, queues={queue}, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        await wait_depth(settings, queue, dead=3)
    finally:
        worker.stop()
    for i in range(5):
        enqueue(broker, queue, "send_email", i)
    for i in range(2):
        enqueue(broker, queue, "send_email", i, delay_ms=3_600_000)

    # Then the depths are exact, and RabbitMQ gives no head age
    st = await wait_depth(settings, queue, waiting=5, delayed=2, dead=3)
    assert (st.waiting, st.delayed, st.dead, st.oldest_age_seconds) == (5, 2, 3, None)

    known = (queue,)
    # A dry run counts only
    res = await queue_admin(settings, None, queue, "clear", "failed", dry_run=True, known_queues=known)
    assert res.count == 3
    assert (await queue_stats(settings, None, queue)).dead == 3
    # Retrying the failed ones moves exactly those 3 back to waiting
    res = await queue_admin(settings, None, queue, "retry", "failed", dry_run=False, known_queues=known)
    assert res.count == 3
    st = await wait_depth(settings, queue, waiting=8, dead=0)
    assert (st.waiting, st.delayed, st.dead) == (8, 2, 0)
    # Clearing the waiting ones leaves the delayed ones
    res = await queue_admin(settings, None, queue, "clear", "waiting", dry_run=False, known_queues=known)
    assert res.count == 8
    st = await wait_depth(settings, queue, waiting=0)
    assert (st.waiting, st.delayed, st.dead) == (0, 2, 0)


async def test_kernel_health_checks_read_rabbitmq_depths(rabbit, exporter_settings):
    import redis.asyncio as aioredis

    from mailgenius.health import DEGRADED, UNHEALTHY, CheckResult
    from mailgenius.queues import queue_check, workers_check

    broker, queue, settings = rabbit
    for i in range(3):
        enqueue(broker, queue, "send_email", i)
    await wait_depth(settings, queue, waiting=3)
    client = aioredis.from_url(settings.redis_url)
    try:
        # the queue check reports the depth, and degrades above its threshold
        assert await queue_check(lambda: client, settings, queue)() == f"{queue}: 3 waiting, 0 delayed, 0 dead"
        over = await queue_check(lambda: client, settings, queue, max_waiting=2)()
        assert isinstance(over, CheckResult) and over.status == DEGRADED
        # no live worker while messages wait: unhealthy
        res = await workers_check(lambda: client, settings, queue)()
        assert res.status == UNHEALTHY and "3 message(s) waiting" in res.detail
    finally:
        await client.aclose()
