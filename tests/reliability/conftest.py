"""Fixtures of the reliability suites: fault proxies in front of the real Postgres and Redis,
each service's app built with its dependencies behind them, and an all-scopes API key."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from prometheus_client import CollectorRegistry

from tests.reliability.proxy import FaultProxy

#: the aiohttp services of the stack (module ``<name>.app`` exposing ``create_app``)
SERVICES = ("sender", "importer", "exporter")
#: every scope an API key may hold
ALL_SCOPES = ("read", "send", "import", "admin")


def create_service_app(name: str, settings):
    module = importlib.import_module(f"{name}.app")
    return module.create_app(settings, registry=CollectorRegistry())


def _proxy_for(url: str, default_port: int) -> FaultProxy:
    p = urlparse(url)
    return FaultProxy(p.hostname or "127.0.0.1", p.port or default_port)


@pytest.fixture
def pg_proxy(database_url):
    with _proxy_for(database_url, 5432) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy(redis_url):
    with _proxy_for(redis_url, 6379) as proxy:
        yield proxy


@pytest.fixture
def proxied_settings(settings, pg_proxy, redis_proxy):
    """Test settings whose Postgres and Redis (and a Redis broker) go through the proxies."""
    changes = {
        "database_url": pg_proxy.url_for(settings.database_url),
        "redis_url": redis_proxy.url_for(settings.redis_url),
    }
    if settings.broker_kind == "redis":
        changes["broker_url"] = redis_proxy.url_for(settings.broker_url)
    return settings.replace(**changes)


@pytest.fixture
async def admin_key(make_key):
    return await make_key(*ALL_SCOPES)


def _stack_class():
    """tests/stack.py's Stack. A ``tests/stack/`` package (the stack suite's folder) shadows the
    module of the same name, so fall back to loading the file by path."""
    try:
        from tests.stack import Stack

        return Stack
    except ImportError:
        path = Path(__file__).resolve().parent.parent / "stack.py"
        spec = importlib.util.spec_from_file_location("tests._stack_harness", path)
        module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
        if spec.name not in sys.modules:
            sys.modules[spec.name] = module  # dataclasses resolve annotations through it
            spec.loader.exec_module(module)
        return module.Stack


@pytest.fixture
def stack(settings, tmp_path):
    """The real stack in subprocesses on free ports; stopped at teardown (overrides the root
    fixture only to survive the module/package name clash above)."""
    st = _stack_class()(settings, tmp_path)
    yield st
    st.stop_all()
