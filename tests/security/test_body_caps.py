"""A JSON body is capped at 1 MiB whatever its transfer encoding (Content-Length or chunked), even
in the importer whose client_max_size is raised to 1 GiB for streamed uploads."""

from __future__ import annotations

import pytest

from mailgenius.web import MAX_JSON_BYTES
from tests.conftest import bearer


def _chunks(total: int, size: int = 64 * 1024):
    async def gen():
        yield b'{"older_than_hours": 1, "pad": "'
        sent = 0
        while sent < total:
            yield b"a" * size
            sent += size
        yield b'"}'
    return gen()


@pytest.mark.parametrize("service,path,scope", [
    ("importer", "/api/upload/cleanup", "import"),
    ("sender", "/api/emails", "send"),
])
async def test_chunked_json_body_over_the_cap_is_413_json(service, path, scope, client_for, make_key):
    # Given a key with the route's scope
    _app, client = await client_for(service)
    key = await make_key("read", scope, "admin")
    # When a 3 MiB JSON body arrives chunked (no Content-Length for the early check)
    resp = await client.post(path, data=_chunks(3 << 20),
                             headers={**bearer(key), "Content-Type": "application/json"})
    # Then it is refused as too large, in the JSON error shape
    text = await resp.text()
    assert resp.status == 413, (resp.status, text[:300])
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    # And the service keeps answering
    assert (await client.get("/api/health")).status in (200, 503)


async def test_chunked_json_body_under_the_cap_is_read(client_for, make_key):
    _app, client = await client_for("importer")
    key = await make_key("read", "import")
    body = b'{"dry_run": true}'

    async def gen():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    resp = await client.post("/api/upload/cleanup", data=gen(),
                             headers={**bearer(key), "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert MAX_JSON_BYTES == 1 << 20
