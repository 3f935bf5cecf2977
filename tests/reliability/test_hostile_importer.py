"""Hostile input against the importer API that schemathesis once found answering 500, pinned as
deterministic regression tests."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import bearer

importer_app = pytest.importorskip("importer.app")


@pytest.fixture
async def importer(aiohttp_client, settings, pool, make_key):
    client = await aiohttp_client(importer_app.create_app(settings, registry=CollectorRegistry()))
    client.key = await make_key("import", "read")
    return client


@pytest.mark.parametrize("method, path", [("GET", "/api/imports/%C2%B2"), ("GET", "/api/imports/%C2%B2/errors"),
                                          ("POST", "/api/imports/%C2%B2/cancel")])
async def test_unicode_digit_ids_are_404_not_500(importer, method, path):
    resp = await importer.request(method, path, headers=bearer(importer.key))
    assert resp.status == 404, (resp.status, await resp.text())


async def test_ascii_unknown_ids_are_404(importer):
    for path in ("/api/imports/999999", "/api/imports/abc", "/api/imports/-1/errors"):
        resp = await importer.get(path, headers=bearer(importer.key))
        assert resp.status == 404, (path, resp.status)


async def test_malformed_multipart_part_header_is_400(importer):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\x0fy\"\r\n\r\nv\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\n"
            f"email\na@b.co\r\n--{boundary}--\r\n").encode()
    resp = await importer.post("/api/upload", data=body, headers={
        **bearer(importer.key), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert 400 <= resp.status < 500, (resp.status, await resp.text())


async def test_multipart_without_boundary_is_4xx(importer):
    resp = await importer.post("/api/upload", data=b"x", headers={
        **bearer(importer.key), "Content-Type": "multipart/form-data"})
    assert 400 <= resp.status < 500, (resp.status, await resp.text())
