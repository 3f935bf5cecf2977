"""The aiohttp kernel: auth, JSON errors, route-template labels, health, logs, promtool."""

import io
import json
import logging
import shutil
import subprocess
import time

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from mailgenius import logs
from mailgenius.web import Route, add_routes, base_app, json_response, read_json
from tests.conftest import bearer, free_port


async def get_thing(request):
    logging.getLogger("test.things").info("read a thing")
    return json_response({"id": request.match_info["id"]})


async def post_thing(request):
    return json_response({"ok": True}, status=201)


async def boom(request):
    raise RuntimeError("secret internals")


async def echo(request):
    return json_response(await read_json(request))


def make_app(settings, registry=None):
    app = base_app(settings, "testsvc", registry=registry)
    add_routes(app, [
        Route("GET", "/api/things/{id}", get_thing),
        Route("POST", "/api/things", post_thing, scope="send"),
        Route("GET", "/api/boom", boom),
        Route("POST", "/api/echo", echo, scope="send"),
    ])
    return app


@pytest.fixture
async def client(aiohttp_client, settings, pool):
    registry = CollectorRegistry()
    c = await aiohttp_client(make_app(settings, registry))
    c.registry = registry
    return c


async def test_missing_key_is_401_json(client):
    resp = await client.get("/api/things/1")
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized"


async def test_wrong_key_is_401(client):
    resp = await client.get("/api/things/1", headers=bearer("mg_nope_nope"))
    assert resp.status == 401


async def test_read_with_any_key_and_write_needs_scope(client, make_key):
    read_key = await make_key("read")
    send_key = await make_key("send")
    admin_key = await make_key("admin")
    assert (await client.get("/api/things/7", headers=bearer(read_key))).status == 200
    resp = await client.post("/api/things", headers=bearer(read_key))
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"
    assert (await client.post("/api/things", headers=bearer(send_key))).status == 201
    assert (await client.post("/api/things", headers=bearer(admin_key))).status == 201


async def test_head_never_bypasses_auth(client):
    resp = await client.head("/api/things/1")
    assert resp.status in (401, 405)


async def test_revoked_key_is_refused(client, make_key, pool):
    key = await make_key("send")
    from mailgenius import auth

    async with pool.acquire() as conn:
        assert await auth.revoke_key(conn, key)
    client.app  # noqa: B018
    # the in-process cache trusts a verified key for AUTH_CACHE_TTL; a fresh key is looked up
    resp = await client.get("/api/things/1", headers=bearer(key))
    assert resp.status == 401


async def test_unhandled_error_is_json_without_traceback(client, make_key):
    key = await make_key("read")
    resp = await client.get("/api/boom", headers=bearer(key))
    assert resp.status == 500
    text = await resp.text()
    assert "secret internals" not in text and "Traceback" not in text
    assert json.loads(text)["error"]["code"] == "internal_error"


async def test_unknown_route_and_method_are_json(client):
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.delete("/api/health")
    assert resp.status == 405 and "error" in await resp.json()


async def test_route_template_labels_bound_series(client, make_key):
    # Given 1,000 distinct ids, When each is requested, Then one series, not 1,000
    key = await make_key("read")
    for i in range(1000):
        assert (await client.get(f"/api/things/{i}", headers=bearer(key))).status == 200
    value = client.registry.get_sample_value(
        "mailgenius_http_requests_total",
        {"service": "testsvc", "method": "GET", "route": "/api/things/{id}", "status": "200"},
    )
    assert value == 1000
    routes = {s.labels["route"] for m in client.registry.collect() if m.name == "mailgenius_http_requests"
              for s in m.samples}
    assert not any(r.startswith("/api/things/") and "{" not in r for r in routes)


async def test_request_id_honoured_or_issued(client):
    resp = await client.get("/api/health", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await client.get("/api/health")
    assert len(resp.headers["X-Request-ID"]) == 32


async def test_log_lines_are_json_with_request_id(client, make_key):
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter("testsvc"))
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        key = await make_key("read")
        await client.get("/api/things/5", headers={**bearer(key), "X-Request-ID": "rid-42"})
        with logs.bound(import_id=9):
            logging.getLogger("x").warning("with ids")
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert records, "nothing logged"
    for rec in records:
        assert {"ts", "level", "service", "logger", "message"} <= rec.keys()
    mine = [r for r in records if r["message"] == "read a thing"]
    assert mine and mine[0]["request_id"] == "rid-42"
    assert [r for r in records if r["message"] == "with ids"][0]["import_id"] == 9


async def test_health_healthy_with_real_services(client):
    resp = await client.get("/api/health")
    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "healthy"
    assert set(body["checks"]) == {"database", "redis"}
    for check in body["checks"].values():
        assert {"status", "latency_ms", "detail"} <= check.keys()
    resp = await client.get("/api/health/redis")
    assert resp.status == 200 and (await resp.json())["status"] == "healthy"
    assert (await client.get("/api/health/nope")).status == 404
    assert client.registry.get_sample_value(
        "mailgenius_health_check_up", {"service": "testsvc", "check": "database"}) == 1


@pytest.mark.parametrize("broken", ["database", "redis"])
async def test_health_unhealthy_fast_when_dependency_unreachable(aiohttp_client, settings, broken):
    # Given a port where nothing listens (or a blackhole), When health is asked,
    # Then 503 "unhealthy" within the timeout, never a hang
    dead = free_port()
    if broken == "database":
        settings = settings.replace(database_url=f"postgresql://postgres@127.0.0.1:{dead}/x")
    else:
        settings = settings.replace(redis_url=f"redis://127.0.0.1:{dead}/0")
    client = await aiohttp_client(make_app(settings))
    start = time.monotonic()
    resp = await client.get("/api/health")
    elapsed = time.monotonic() - start
    body = await resp.json()
    assert resp.status == 503
    assert body["status"] == "unhealthy"
    assert body["checks"][broken]["status"] == "unhealthy"
    assert elapsed < settings.health_timeout + 1.0


async def test_health_times_out_on_a_blackhole(aiohttp_client, settings):
    # A listener that accepts and never answers: the check must time out, not hang
    import asyncio

    async def silent(reader, writer):
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await aiohttp_client(make_app(settings.replace(redis_url=f"redis://127.0.0.1:{port}/0")))
        start = time.monotonic()
        resp = await client.get("/api/health/redis")
        assert resp.status == 503
        assert time.monotonic() - start < settings.health_timeout + 1.0
    finally:
        server.close()


@pytest.mark.parametrize("service", ["sender", "importer", "exporter"])
async def test_promtool_accepts_every_metrics_page(aiohttp_client, settings, pool, service):
    import importlib

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (make test installs Debian 'prometheus')")
    module = importlib.import_module(f"{service}.app")
    client = await aiohttp_client(module.create_app(settings, registry=CollectorRegistry()))
    await client.get("/api/health")
    await client.get("/nope")
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    assert "mailgenius_http_requests_total" in text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_openapi_document(client):
    resp = await client.get("/api/openapi.json")
    doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    assert "/api/things/{id}" in doc["paths"]
    assert doc["paths"]["/api/things"]["post"]["security"] == [{"bearer": []}]


def test_duplicate_scope_for_one_handler_is_refused(settings):
    app = base_app(settings, "x")
    with pytest.raises(ValueError):
        add_routes(app, [Route("GET", "/a", get_thing), Route("GET", "/b", get_thing, scope="admin")])
    _ = web


# -- the request path under load: what the performance work must not have changed -------------

async def test_issued_request_ids_are_unique(client):
    ids = {(await client.get("/api/health")).headers["X-Request-ID"] for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


async def test_invented_methods_share_one_label_value(client):
    # Given requests with rarer methods the HTTP parser knows, When they are counted,
    # Then one "other" series (the method label keeps a fixed set of values)
    for method in ("PROPFIND", "PURGE", "MKCOL"):
        resp = await client.request(method, "/api/health")
        assert resp.status == 405 and (await resp.json())["error"]
    methods = {s.labels["method"] for m in client.registry.collect() if m.name == "mailgenius_http_requests"
               for s in m.samples}
    assert "other" in methods and not methods & {"PROPFIND", "PURGE", "MKCOL"}
    # and a method it does not know is refused by the parser, in the JSON error shape too
    resp = await client.request("FOO", "/api/health")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"


async def test_slow_requests_are_logged_with_their_route(client, make_key, monkeypatch):
    from mailgenius import web as kernel_web

    monkeypatch.setattr(kernel_web, "SLOW_REQUEST_SECONDS", 0.0)  # every request counts as slow
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter("testsvc"))
    logging.getLogger().addHandler(handler)
    try:
        key = await make_key("read")
        await client.get("/api/things/77", headers={**bearer(key), "X-Request-ID": "slow-1"})
    finally:
        logging.getLogger().removeHandler(handler)
    slow = [json.loads(line) for line in buf.getvalue().splitlines() if '"slow request"' in line]
    assert slow and slow[0]["route"] == "/api/things/{id}" and slow[0]["status"] == 200
    assert slow[0]["request_id"] == "slow-1" and slow[0]["level"] == "warning"


async def test_concurrent_lookups_of_one_key_share_one_query(settings, pool, make_key):
    # Given a key nobody has looked up yet, When 100 requests present it at once,
    # Then Postgres is asked once, and all get its scopes
    import asyncio

    from mailgenius import auth

    key = await make_key("send")
    acquired = 0

    class CountingPool:
        def acquire(self, *a, **kw):
            nonlocal acquired
            acquired += 1
            return pool.acquire(*a, **kw)

    cache: dict = {}
    results = await asyncio.gather(*(auth.lookup(CountingPool(), key, cache) for _ in range(100)))
    assert all(r == frozenset({"send"}) for r in results)
    assert acquired == 1
    # a bogus key is cached as refused too, and the cache holds no in-flight leftovers
    assert await auth.lookup(CountingPool(), "mg_nope_" + "x" * 43, cache) is None
    assert all(isinstance(k, str) for k in cache)


async def test_revocation_is_seen_once_the_cache_entry_expires(settings, pool, make_key, monkeypatch):
    import asyncio

    from mailgenius import auth

    monkeypatch.setattr(auth, "AUTH_CACHE_TTL", 0.2)
    key = await make_key("send")
    cache: dict = {}
    assert await auth.lookup(pool, key, cache) == frozenset({"send"})
    async with pool.acquire() as conn:
        await auth.revoke_key(conn, key)
    assert await auth.lookup(pool, key, cache) == frozenset({"send"})  # trusted while cached
    await asyncio.sleep(0.25)
    assert await auth.lookup(pool, key, cache) is None


async def test_clean_reads_skip_the_reset_and_other_uses_keep_it(settings, pool):
    # Given a service pool of one connection (so every use gets the same backend)
    from mailgenius.db import fetchrow_read, pool_ctx

    app: dict = {}
    ctx = pool_ctx(settings.replace(db_pool_max=1), "db")(app)
    await ctx.__anext__()
    try:
        svc = app["db"]
        pid = (await fetchrow_read(svc, "SELECT pg_backend_pid() AS pid"))["pid"]

        async def last_statement() -> str:  # what that backend ran last, seen from elsewhere
            return await pool.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)

        # When a clean read releases the connection, Then no reset statement follows it
        await fetchrow_read(svc, "SELECT 41 + 1 AS answer")
        assert "41 + 1" in await last_statement()
        # When any other use releases it, Then the full reset runs, and session state never leaks
        await svc.execute("SET statement_timeout = '4321ms'")
        assert "RESET ALL" in await last_statement()
        assert (await fetchrow_read(svc, "SHOW statement_timeout"))[0] != "4321ms"
        async with svc.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL work_mem = '7MB'")
        assert "RESET ALL" in await last_statement()
    finally:
        with pytest.raises(StopAsyncIteration):
            await ctx.__anext__()


async def test_health_under_heavy_probing_is_shared_fresh_and_sees_failures(settings):
    """A lone probe always gets a new round (the fault tests rely on it); 2,000 probes a
    second share rounds, each answer at most STALE_SECONDS old, and a failure shows within
    FRESH_SECONDS plus the round's own time."""
    import asyncio

    from mailgenius import health as h

    reg = h.HealthRegistry(service="t", timeout=1.0)
    rounds = 0
    failing = False

    async def dep():
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0.005)
        if failing:
            raise ConnectionError("down")

    reg.add("dep", dep)
    # a lone probe: a round of its own each time
    for _ in range(3):
        assert (await reg.run())[0] == h.HEALTHY
        await asyncio.sleep(0.05)
    assert rounds == 3
    # heavy probing: about 2,000 probes a second for 1.5 s
    rounds = 0
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    failed_at = None
    while time.monotonic() - start < 1.5:
        if failed_at is None and time.monotonic() - start > 0.75:
            failing, failed_at = True, time.monotonic()
        status, _ = (await asyncio.gather(*(reg.run() for _ in range(10))))[-1]
        seen.append((time.monotonic(), status))
        await asyncio.sleep(0.005)
    assert len(seen) > 100
    assert rounds < 20, f"{rounds} rounds for {len(seen) * 10} probes"
    first_unhealthy = min(t for t, s in seen if s == h.UNHEALTHY)
    assert first_unhealthy - failed_at < h.FRESH_SECONDS + 0.2
    assert all(s == h.UNHEALTHY for t, s in seen if t > first_unhealthy)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_oversized_body_is_413_json_however_it_is_framed(client, make_key, framing):
    # Given a body over the 1 MiB cap, sent with a Content-Length or chunked (no length up front)
    key = await make_key("send")
    big = b'{"a": "' + b"x" * ((1 << 20) + 10) + b'"}'

    async def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    data = io.BytesIO(big) if framing == "content-length" else chunks()
    resp = await client.post("/api/echo", data=data, headers={**bearer(key), "Content-Type": "application/json"})
    # Then 413 in the JSON error shape, and a small body still goes through
    assert resp.status == 413, await resp.text()
    assert (await resp.json())["error"]["code"]
    resp = await client.post("/api/echo", json={"a": 1}, headers=bearer(key))
    assert resp.status == 200 and await resp.json() == {"a": 1}
