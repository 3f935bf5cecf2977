"""Fixtures of the monitoring page suites: the page mounted on a kernel app (unit level) and
helpers to log in."""

from __future__ import annotations

import pytest

from exporter.monitoring_page import setup_monitoring_page
from exporter.monitoring_page.routes import BASE
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
    return await aiohttp_client(app)


async def login(client, key: str) -> None:
    """Log the client in through the ?key= exchange (the cookie jar keeps the session)."""
    resp = await client.get(BASE, params={"key": key}, allow_redirects=False)
    assert resp.status == 303, await resp.text()


def load_stack_harness():
    """The lead's harness ``tests/stack.py``. While a ``tests/stack/`` package (the stack suite)
    shadows that module name, load the file by path instead."""
    try:
        from tests import stack as harness

        if hasattr(harness, "Stack"):
            return harness
    except ImportError:
        pass
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "stack.py"
    spec = importlib.util.spec_from_file_location("tests._stack_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
