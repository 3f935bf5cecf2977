"""The stack harness itself: services, a worker, the exporters and Prometheus really start,
Prometheus scrapes them all, and the worker announces itself by heartbeat."""

import asyncio

import pytest
import redis.asyncio as aioredis

from mailgenius.queues import worker_count
from tests.stack import (
    ALERTMANAGER,
    NODE_EXPORTER,
    POSTGRES_EXPORTER,
    PROMETHEUS,
    REDIS_EXPORTER,
    require_binaries,
)

pytestmark = pytest.mark.slow


def test_services_exporters_and_prometheus_come_up(stack, pool):
    require_binaries(PROMETHEUS, ALERTMANAGER, POSTGRES_EXPORTER, REDIS_EXPORTER, NODE_EXPORTER)
    # Given the three services and the exporters, When Prometheus scrapes them every second,
    # Then every target is up and each carries its service label
    for name in ("sender", "importer", "exporter"):
        stack.start_service(name)
    stack.start_exporters()
    stack.start_prometheus(alertmanager=False)
    stack.wait_targets_up(timeout=30)
    up = {r["metric"]["service"]: r["value"][1] for r in stack.prom_query("up")}
    assert up == {"sender": "1", "importer": "1", "exporter": "1", "postgres": "1", "redis": "1", "node": "1"}


def test_stopped_service_is_down(stack, pool):
    stack.start_service("importer")
    stack.stop("importer")
    assert not stack.procs["importer"].alive


async def test_worker_heartbeat_counts_and_expires(stack, settings, pool):
    # Given a real worker group, Then it is counted on its queue; When it stops, Then it is not
    stack.start_worker("importer")
    client = aioredis.from_url(settings.redis_url)
    try:
        for _ in range(50):
            if await worker_count(client, settings.redis_prefix, "lead-import") >= 1:
                break
            await asyncio.sleep(0.2)
        assert await worker_count(client, settings.redis_prefix, "lead-import") >= 1
        stack.stop("importer-worker")
        assert await worker_count(client, settings.redis_prefix, "lead-import") == 0
    finally:
        await client.aclose()
