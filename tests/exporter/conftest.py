"""Fixtures of the exporter suite: the exporter app on the test database / Redis prefix with its
own registry, a real dramatiq Redis broker in the test namespace, and samples read back."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from exporter import keys as ek
from exporter.app import create_app
from mailgenius.broker import build_broker
from mailgenius.metrics import QUEUES
from tests.conftest import free_port

#: the exporter's Alertmanager webhook token in these suites (send ``WEBHOOK_AUTH``)
WEBHOOK_TOKEN = "exporter-suite-webhook-token-0123456789"
WEBHOOK_AUTH = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}


@pytest.fixture
def exporter_settings(settings):
    # the Redis broker in this session's namespace (these suites read dramatiq's Redis keys);
    # no other service runs: their URLs point at closed ports of this machine
    closed = {name: f"http://127.0.0.1:{free_port()}" for name in ("sender", "importer", "prom", "am")}
    return settings.replace(broker_url=settings.redis_url, sender_url=closed["sender"],
                            importer_url=closed["importer"], prometheus_url=closed["prom"],
                            alertmanager_url=closed["am"],
                            exporter=settings.exporter.replace(webhook_token=WEBHOOK_TOKEN))


@pytest.fixture
async def exporter(aiohttp_client, exporter_settings, pool):
    """(client, app, registry); refresh snapshots with ``await app[ek.REFRESHER].refresh_once()``."""
    registry = CollectorRegistry()
    app = create_app(exporter_settings, registry=registry)
    client = await aiohttp_client(app)
    client.registry = registry
    client.exporter_app = app

    async def refresh():
        await app[ek.REFRESHER].refresh_once()

    client.refresh = refresh
    return client


@pytest.fixture
def broker(exporter_settings):
    """A real dramatiq RedisBroker in the session's namespace; its queues are emptied after."""
    b = build_broker(exporter_settings)
    for q in QUEUES:
        b.declare_queue(q)
    b.flush_all()
    yield b
    b.flush_all()
    b.close()
