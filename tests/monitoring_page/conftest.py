"""Fixtures of the monitoring page suites: the page mounted on a kernel app (unit level) and
helpers to log in."""

from __future__ import annotations

import pytest

from exporter.monitoring_page import setup_monitoring_page
from exporter.monitoring_page.routes import BASE
from mailgenius.keys import REDIS
from mailgenius.web import base_app
from tests.conftest import free_port


@pytest.fixture
def page_settings(settings):
    """Test settings whose Prometheus and Alertmanager are down (nothing listens there)."""
    return settings.replace(prometheus_url=f"http://127.0.0.1:{free_port()}",
                            alertmanager_url=f"http://127.0.0.1:{free_port()}")


@pytest.fixture
async def page_client(aiohttp_client, page_settings, pool):
    """The page on a bare kernel app (Postgres + Redis), as the exporter mounts it."""
    app = base_app(page_settings, "exporter")
    setup_monitoring_page(app)
    client = await aiohttp_client(app)
    # failed sign-ins are counted per address across the session's tests: start each from zero
    redis = app[REDIS]
    async for key in redis.scan_iter(match=f"{page_settings.redis_prefix}:page-login-failures:*"):
        await redis.delete(key)
    return client


async def login(client, key: str) -> None:
    """Log the client in through the login form (the cookie jar keeps the session)."""
    resp = await client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False)
    assert resp.status == 303, await resp.text()

