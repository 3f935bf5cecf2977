"""Hostile callers against every service, table-driven from each service's route table
(``app[mailgenius.keys.ROUTES]``), so a route added tomorrow is covered without a new test:

* every route that declares a scope refuses a missing or bogus key (401) and every write route
  refuses a key lacking its scope (403), always as ``{"error": {"code", "message"}}``;
* oversized bodies and headers get a 4xx, never a 5xx, and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from mailgenius import keys
from tests.conftest import bearer
from tests.reliability.conftest import SERVICES, create_service_app
from tests.reliability.routes import (
    concrete_path,
    is_write,
    needs_key,
    required_scope,
    routes,
    under_scoped,
)

#: bytes of an oversized JSON body: above the kernel's 1 MiB client_max_size
BIG_BODY = 2 * (1 << 20) + 17
#: the exporter's Alertmanager webhook token here (that route takes it instead of an API key)
WEBHOOK_TOKEN = "reliability-suite-webhook-token-0123456789"


async def assert_error_json(resp, status: int | tuple[int, ...], where: str) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    text = await resp.text()
    assert resp.status in statuses, f"{where}: expected {statuses}, got {resp.status}: {text[:300]}"
    assert resp.content_type == "application/json", f"{where}: {resp.content_type}: {text[:200]}"
    err = (await resp.json())["error"]
    assert isinstance(err["code"], str) and err["code"], where
    assert isinstance(err["message"], str) and err["message"], where
    return err


@pytest.fixture
async def client_for(aiohttp_client, settings, pool):
    async def make(name: str, **changes):
        # as deployed: the sender's webhook secret is set (else its webhook honestly answers 503)
        changes.setdefault("resend_webhook_secret", "whsec_" + "cmVsaWFiaWxpdHktc3VpdGUtc2VjcmV0")
        changes.setdefault("exporter", settings.exporter.replace(webhook_token=WEBHOOK_TOKEN))
        app = create_service_app(name, settings.replace(**changes))
        return app, await aiohttp_client(app)

    return make


@pytest.mark.parametrize("service", SERVICES)
async def test_every_guarded_route_refuses_missing_bogus_and_underscoped_keys(service, client_for, make_key):
    app, client = await client_for(service)
    table = [r for r in routes(app) if needs_key(r)]
    assert table, f"{service} declares no guarded route at all"
    revoked = await make_key("admin")
    async with app[keys.DB].acquire() as conn:
        await conn.execute("UPDATE api_keys SET revoked_at = now()")
    failures: list[str] = []
    checked = 0
    for route in table:
        path = concrete_path(route.path)
        where = f"{service} {route.method} {route.path}"
        for label, headers in (("no key", {}),
                               ("not bearer", {"Authorization": "Basic dXNlcjpwYXNz"}),
                               ("empty bearer", {"Authorization": "Bearer "}),
                               ("bogus key", bearer("mg_deadbeef_" + "x" * 43)),
                               ("revoked key", bearer(revoked))):
            resp = await client.request(route.method, path, headers=headers, json={})
            try:
                await assert_error_json(resp, 401, f"{where} with {label}")
            except AssertionError as exc:
                failures.append(str(exc))
            checked += 1
        if is_write(route):
            scope = required_scope(route)
            key = await make_key(*under_scoped(scope))
            resp = await client.request(route.method, path, headers=bearer(key), json={})
            try:
                err = await assert_error_json(resp, 403, f"{where} with a key lacking '{scope}'")
                assert scope in err["message"], err
            except AssertionError as exc:
                failures.append(str(exc))
            checked += 1
    assert not failures, f"{len(failures)} of {checked} checks failed:\n" + "\n".join(failures)


def _chunked(body: bytes, size: int = 256 * 1024):
    async def gen():
        for i in range(0, len(body), size):
            yield body[i:i + size]
    return gen()


@pytest.mark.parametrize("encoding", ["content-length", "chunked"])
@pytest.mark.parametrize("service", SERVICES)
async def test_oversized_json_bodies_are_4xx_json(service, encoding, client_for, make_key):
    # Given a key with every scope (so auth is not what refuses)
    app, client = await client_for(service)
    key = await make_key("read", "send", "import", "admin")
    big = b'{"name": "' + b"a" * BIG_BODY + b'"}'
    writes = [r for r in routes(app)
              if is_write(r) and r.request_schema is not None and r.request_content == "application/json"]
    failures = []
    for route in writes:
        # the cap holds whatever the transfer encoding: a declared length, or a chunked stream
        # (no Content-Length for an early check; the importer raises client_max_size to 1 GiB)
        if encoding == "chunked":
            data, length = _chunked(big), {}
        else:
            data, length = io.BytesIO(big), {"Content-Length": str(len(big))}
        auth = bearer(WEBHOOK_TOKEN if route.path == "/api/alerts/webhook" else key)
        resp = await client.request(route.method, concrete_path(route.path), data=data,
                                    headers={**auth, "Content-Type": "application/json", **length})
        try:
            # a route may refuse earlier for another reason (unknown id: 404), never accept it
            await assert_error_json(resp, (404, 413), f"{service} {route.method} {route.path}")
        except AssertionError as exc:
            failures.append(str(exc))
    assert writes, f"{service} has no JSON write route"
    assert not failures, "\n".join(failures)
    # And the service still answers
    assert (await client.get("/api/health")).status in (200, 503)


async def raw_request(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return data


@pytest.mark.parametrize("what", ["one huge header", "too many headers", "huge request line"])
async def test_oversized_headers_are_refused_with_400(what, client_for):
    app, client = await client_for("sender")
    port = client.server.port
    head = {
        "one huge header": b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        "too many headers": b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
                            + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
        "huge request line": b"GET /api/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    }[what]
    data = await raw_request(port, head)
    status_line = data.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"400", b"413", b"414", b"431"), data[:200]
    # the service keeps serving normal requests afterwards
    assert (await client.get("/api/openapi.json")).status == 200


@pytest.mark.parametrize("what", ["one huge header", "too many headers", "huge request line", "malformed"])
async def test_parser_refusals_are_json_errors(what, client_for):
    # Given a service, When a request is refused by aiohttp's HTTP parser (before any middleware)
    app, client = await client_for("sender")
    head = {
        "one huge header": b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        "too many headers": b"GET /api/health HTTP/1.1\r\nHost: x\r\n"
                            + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
        "huge request line": b"GET /api/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "malformed": b"GET /api/health HTTP/1.1\r\nHost: x\r\nBad Header Name: v\r\n\r\n",
    }[what]
    data = await raw_request(client.server.port, head)
    # Then the answer is a 400 in the JSON error shape, not aiohttp's text/plain page
    head_part, _, body = data.partition(b"\r\n\r\n")
    assert head_part.split(b"\r\n", 1)[0].split()[1] == b"400", data[:300]
    assert b"content-type: application/json" in head_part.lower(), data[:300]
    err = json.loads(body)["error"]
    assert err["code"] == "bad_request" and err["message"], err
    assert b"aaaaaaaa" not in body  # the offending bytes are not echoed back
    # And the service keeps serving normal requests afterwards
    assert (await client.get("/api/openapi.json")).status == 200


async def test_request_id_header_is_not_reflected_when_hostile(client_for):
    app, client = await client_for("sender")
    resp = await client.get("/api/health", headers={"X-Request-ID": "a" * 5000})
    assert len(resp.headers["X-Request-ID"]) <= 128
    resp = await client.get("/api/health", headers={"X-Request-ID": "evil\tid"})
    assert resp.headers["X-Request-ID"] != "evil\tid"


async def test_upload_over_the_cap_is_413_and_leaves_nothing(client_for, make_key, settings):
    import os

    from aiohttp import FormData

    app, client = await client_for("importer", upload_max_bytes=4096)
    key = await make_key("import")
    form = FormData()
    form.add_field("file", io.BytesIO(b"email\n" + b"someone@example.com\n" * 1000), filename="big.csv",
                   content_type="text/csv")
    resp = await client.post("/api/upload", data=form, headers=bearer(key))
    await assert_error_json(resp, 413, "upload over the cap")
    upload_dir = settings.upload_dir
    left = os.listdir(upload_dir) if os.path.isdir(upload_dir) else []
    assert left == [], f"partial upload left behind: {left}"
    async with app[keys.DB].acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM imports") == 0
