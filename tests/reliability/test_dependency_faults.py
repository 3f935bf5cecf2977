"""Each service with Postgres or Redis behind the fault proxy: health turns unhealthy (503)
within a second or two, /api/* answers 503 JSON (never 500, never a hang) while the dependency
is unreachable, and everything recovers once the proxy passes traffic again."""

from __future__ import annotations

import asyncio
import time

import pytest

from exporter.collectors import REFRESH_TIMEOUT
from mailgenius import keys
from tests.conftest import bearer
from tests.reliability.conftest import SERVICES, create_service_app
from tests.reliability.routes import api_reads, concrete_path

#: slack over the slowest declared health-check timeout of a service (the kernel's default is
#: 1 s; the sender gives its provider check 2.5 s) within which health must say unhealthy
HEALTH_SLACK = 0.5
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


def health_deadline(app) -> float:
    reg = app[keys.HEALTH]
    return max((c.timeout or reg.timeout) for c in reg.checks.values()) + HEALTH_SLACK


async def assert_unhealthy(client, check: str):
    HEALTH_DEADLINE = health_deadline(client.server.app)
    resp, body, elapsed = await timed(client.get("/api/health"))
    assert resp.status == 503, body
    data = await resp.json()
    assert data["status"] == "unhealthy"
    assert data["checks"][check]["status"] == "unhealthy", data
    assert elapsed < HEALTH_DEADLINE, f"health took {elapsed:.2f}s"
    resp, body, elapsed = await timed(client.get(f"/api/health/{check}"))
    assert resp.status == 503 and elapsed < HEALTH_DEADLINE, (resp.status, elapsed)


async def assert_api_never_500(client, app, key: str, *, expect_503: bool, deadline: float,
                               limit: int | None = None):
    """Every read route (the first ``limit``): a JSON answer within ``deadline``; 503
    ``unavailable`` when ``expect_503``, otherwise anything but a 5xx (routes that do not need
    the dependency)."""
    for route in api_reads(app)[:limit]:
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


@pytest.mark.slow
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
    if mode == "latency" and dep == "postgres":
        pass  # a slow database makes requests slow, not wrong: only health is bounded here
    else:
        # a blackholed Postgres: the API pool's 1 s statement and connect timeouts bound every
        # request (test_blackholed_postgres_is_503_within_the_deadline sweeps every service)
        deadline = API_DEADLINE if dep == "postgres" and mode == "blackhole" else 2.5
        # (the down test above sweeps every route; here a few prove the bound, in budget)
        await assert_api_never_500(client, app, key, expect_503=(dep == "postgres"), deadline=deadline,
                                   limit=3)
    proxy.set_mode("pass")
    await wait_healthy(client)


@pytest.mark.slow
@pytest.mark.parametrize("service", SERVICES)
async def test_blackholed_postgres_is_503_within_the_deadline(service, service_client, pg_proxy, make_key):
    """A Postgres that accepts and never answers: requests on pooled connections (warmed first)
    and on new ones answer 503 JSON within API_DEADLINE, not after the 30 s a long statement
    timeout would take; the connections that timed out are discarded, so the service is
    healthy again as soon as Postgres answers."""
    app, client = await service_client(service)
    await wait_healthy(client)
    key = await make_key("read", "send", "import", "admin")
    # Given pooled connections, warmed by reads that need Postgres
    for route in api_reads(app)[:4]:
        await client.get(concrete_path(route.path), headers=bearer(key))
    pool = app[keys.DB]
    assert pool.get_size() >= 1
    # When Postgres is blackholed
    pg_proxy.set_mode("blackhole")
    # Then every read route answers within the deadline: 503 JSON where it needs Postgres (a
    # route that degrades gracefully, like the exporter's operator summary, may answer 200)
    statuses, slowest = {}, 0.0
    for route in api_reads(app):
        path = concrete_path(route.path)
        resp, body, elapsed = await timed(client.get(path, headers=bearer(key)))
        where = f"GET {path} -> {resp.status} in {elapsed:.2f}s: {body[:200]!r}"
        assert elapsed < API_DEADLINE, where
        assert resp.status < 500 or resp.status == 503, where
        if resp.status == 503:
            assert resp.content_type == "application/json" and (await resp.json())["error"]["code"], where
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        slowest = max(slowest, elapsed)
    assert statuses.get(503, 0) >= 1, statuses
    print(f"\n{service}: blackholed Postgres, {len(api_reads(app))} read routes answered {statuses}; "
          f"slowest {slowest:.2f} s (deadline {API_DEADLINE} s)")
    # And once it answers again, the service is healthy at once (no poisoned connection left)
    pg_proxy.set_mode("pass")
    t0 = time.monotonic()
    await wait_healthy(client, deadline=3.0)
    for route in api_reads(app):
        resp = await client.get(concrete_path(route.path), headers=bearer(key))
        assert resp.status < 500, (route.path, resp.status, await resp.text())
    print(f"{service}: healthy and serving {time.monotonic() - t0:.2f} s after Postgres answered again")


#: Prometheus' scrape timeout for our jobs (prometheus/prometheus.yml): a scrape must beat it
SCRAPE_TIMEOUT = 5.0
#: the exporter's collectors that read Postgres
PG_COLLECTORS = ("leads", "campaigns", "campaign_messages", "incidents", "imports")


def _collector_up(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "mailgenius_exporter_collector_up":
                out[s.labels["collector"]] = s.value
    return out


@pytest.mark.parametrize("mode", ["down", "blackhole"])
async def test_exporter_scrape_answers_in_time_with_postgres_down(mode, aiohttp_client, proxied_settings,
                                                                   pg_proxy, pool, monkeypatch):
    # Given the exporter refreshing its snapshots every 0.5 s, Postgres behind the proxy
    app = create_service_app("exporter", proxied_settings.replace(
        exporter=proxied_settings.exporter.replace(refresh_seconds=0.5)))
    client = await aiohttp_client(app)

    async def scrape():
        resp, body, elapsed = await timed(client.get("/metrics"))
        assert resp.status == 200, body[:300]
        assert elapsed < 1.0, f"scrape took {elapsed:.2f}s"
        return _collector_up(body.decode())

    async def wait_for(pred, what, deadline=12.0):
        end = time.monotonic() + deadline
        up = {}
        while time.monotonic() < end:
            up = await scrape()
            if pred(up):
                return up
            await asyncio.sleep(0.3)
        raise AssertionError(f"{what} not seen within {deadline}s: {up}")

    up = await wait_for(lambda u: u and all(v == 1 for v in u.values()), "every collector up")
    # When Postgres becomes unreachable
    pg_proxy.set_mode(mode)
    t_fault = time.monotonic()
    # Then every scrape still answers well within the scrape timeout (from the last snapshot), and
    # says what is missing: the Postgres collectors drop to 0 within the refresh deadline (a
    # blackholed query is abandoned at its deadline, not waited out), the others stay up
    deadline = REFRESH_TIMEOUT + 3.0
    up = await wait_for(lambda u: any(v == 0 for v in u.values()), "a Postgres collector down", deadline=deadline)
    t_down = time.monotonic() - t_fault
    assert any(v == 1 for v in up.values()), f"collectors not needing Postgres should stay up: {up}"
    up = await wait_for(lambda u: all(u[c] == 0 for c in PG_COLLECTORS), "every Postgres collector down",
                        deadline=deadline)
    print(f"\nexporter, Postgres {mode}: first collector_up 0 after {t_down:.1f} s, "
          f"all Postgres collectors 0 after {time.monotonic() - t_fault:.1f} s")
    for _ in range(3):
        await scrape()
        await asyncio.sleep(0.2)
    # And it recovers by itself
    pg_proxy.set_mode("pass")
    await wait_for(lambda u: all(v == 1 for v in u.values()), "recovery", deadline=15.0)


async def test_concurrent_health_probes_share_one_round_of_checks(service_client):
    """2,000 probes a second must not mean 2,000 rounds of dependency checks a second."""
    app, client = await service_client("sender")
    await wait_healthy(client)
    reg = app[keys.HEALTH]
    calls = 0
    original = reg.checks["database"].fn

    async def counting():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # a slow-ish round, so the probes overlap
        return await original()

    reg.checks["database"].fn = counting
    responses = await asyncio.gather(*(client.get("/api/health") for _ in range(50)))
    assert all(r.status == 200 for r in responses)
    assert calls < 10, f"{calls} rounds of checks for 50 concurrent probes"
