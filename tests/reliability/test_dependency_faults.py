"""Each service with Postgres or Redis behind the fault proxy: health turns unhealthy (503)
within a second or two, /api/* answers 503 JSON (never 500, never a hang) while the dependency
is unreachable, and everything recovers once the proxy passes traffic again."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import bearer
from tests.reliability.conftest import SERVICES, create_service_app
from tests.reliability.routes import api_reads, concrete_path

#: seconds within which health must say unhealthy: the kernel's per-check timeout (1 s) plus the
#: second asyncpg spends cancelling a query stuck on a blackholed connection (measured: 2.0 s)
HEALTH_DEADLINE = 2.5
#: seconds within which an /api/* request must answer while a dependency is down
API_DEADLINE = 1.5
#: seconds allowed for a service to report healthy again after the dependency returns
RECOVERY_DEADLINE = 10.0

DEP_CHECK = {"postgres": "database", "redis": "redis"}


async def timed(coro):
    start = time.monotonic()
    resp = await coro
    body = await resp.read()
    return resp, body, time.monotonic() - start


async def wait_healthy(client, deadline=RECOVERY_DEADLINE):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        resp = await client.get("/api/health")
        last = await resp.json()
        if resp.status == 200:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"service did not recover within {deadline}s: {last}")


async def assert_unhealthy(client, check: str):
    resp, body, elapsed = await timed(client.get("/api/health"))
    assert resp.status == 503, body
    data = await resp.json()
    assert data["status"] == "unhealthy"
    assert data["checks"][check]["status"] == "unhealthy", data
    assert elapsed < HEALTH_DEADLINE, f"health took {elapsed:.2f}s"
    resp, body, elapsed = await timed(client.get(f"/api/health/{check}"))
    assert resp.status == 503 and elapsed < HEALTH_DEADLINE, (resp.status, elapsed)


async def assert_api_never_500(client, app, key: str, *, expect_503: bool, deadline: float):
    """Every read route: a JSON answer within ``deadline``; 503 ``unavailable`` when
    ``expect_503``, otherwise anything but a 5xx (routes that do not need the dependency)."""
    for route in api_reads(app):
        path = concrete_path(route.path)
        resp, body, elapsed = await timed(client.get(path, headers=bearer(key)))
        where = f"GET {path} -> {resp.status} in {elapsed:.2f}s: {body[:200]!r}"
        assert elapsed < deadline, where
        assert resp.status != 500, where
        if resp.status >= 500 or expect_503:
            assert resp.status == 503, where
            assert resp.content_type == "application/json", where
            err = (await resp.json())["error"]
            assert err["code"] and err["message"], where


@pytest.fixture
def service_client(aiohttp_client, proxied_settings, pool):
    async def make(name: str):
        app = create_service_app(name, proxied_settings)
        client = await aiohttp_client(app)
        return app, client

    return make


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("dep", ["postgres", "redis"])
async def test_dependency_down_503_then_recovers(service, dep, service_client, pg_proxy, redis_proxy, make_key):
    proxy = pg_proxy if dep == "postgres" else redis_proxy
    # Given a healthy service and a key it has never seen (so auth must ask Postgres)
    app, client = await service_client(service)
    await wait_healthy(client)
    key = await make_key("read", "send", "import", "admin")
    # When the dependency goes down (connection refused, open connections cut)
    proxy.set_mode("down")
    # Then health is unhealthy within a couple of seconds, and /api/* answers 503 JSON quickly
    await assert_unhealthy(client, DEP_CHECK[dep])
    await assert_api_never_500(client, app, key, expect_503=(dep == "postgres"), deadline=API_DEADLINE)
    # When it comes back, the service recovers by itself
    proxy.set_mode("pass")
    await wait_healthy(client)
    for route in api_reads(app):
        resp = await client.get(concrete_path(route.path), headers=bearer(key))
        assert resp.status < 500, (route.path, resp.status, await resp.text())


@pytest.mark.parametrize("dep", ["postgres", "redis"])
@pytest.mark.parametrize("mode", ["blackhole", "reset", "latency"])
async def test_kernel_survives_network_faults(dep, mode, service_client, pg_proxy, redis_proxy, make_key):
    """The kernel (shared by every service) under the nastier faults, on the sender: a server
    that accepts and never answers, connections reset, 3 s of latency per chunk."""
    proxy = pg_proxy if dep == "postgres" else redis_proxy
    app, client = await service_client("sender")
    await wait_healthy(client)
    key = await make_key("admin")
    # warm the pools, so the fault hits connections already open as well as new ones
    for _ in range(3):
        await client.get("/api/health")
    proxy.set_mode(mode, latency=3.0)
    await assert_unhealthy(client, DEP_CHECK[dep])
    if dep == "postgres" and mode in ("blackhole", "latency"):
        # auth itself needs Postgres; asyncpg's connect timeout bounds the wait
        deadline = 6.0
    else:
        deadline = 2.5 if dep == "redis" else API_DEADLINE
    await assert_api_never_500(client, app, key, expect_503=(dep == "postgres"), deadline=deadline)
    proxy.set_mode("pass")
    await wait_healthy(client)
