"""Values Postgres refuses (SQLSTATE class 22: NUL characters, timestamps or numbers out of
range) are the client's fault: the kernel answers 422 JSON, never 500. Found by schemathesis on
the sender (NUL in a campaign name), the importer (cleanup age out of range) and the exporter
(alert startsAt in year 3407)."""

from __future__ import annotations

import pytest

from mailgenius import keys
from mailgenius.web import Route, add_routes, base_app, json_response, read_json


async def echo_through_postgres(request):
    body = await read_json(request)
    value = await request.app[keys.DB].fetchval(f"SELECT $1::text::{body['type']}::text", body["value"])
    return json_response({"value": value})


@pytest.fixture
async def client(aiohttp_client, settings, pool):
    app = base_app(settings, "datasvc")
    add_routes(app, [Route("POST", "/echo", echo_through_postgres, scope=None)])
    return await aiohttp_client(app)


@pytest.mark.parametrize("type_, value", [
    ("text", "nul \x00 inside"),
    ("timestamptz", "3407-03-09T09:08:57-16:03 BC"),
    ("smallint", "70000"),
    ("int", "twelve"),
])
async def test_postgres_data_errors_are_422_json(client, type_, value):
    resp = await client.post("/echo", json={"type": type_, "value": value})
    assert resp.status == 422, await resp.text()
    err = (await resp.json())["error"]
    assert err["code"] == "invalid_value" and err["message"]


async def test_good_values_still_pass(client):
    resp = await client.post("/echo", json={"type": "int", "value": "12"})
    assert resp.status == 200 and (await resp.json()) == {"value": "12"}
