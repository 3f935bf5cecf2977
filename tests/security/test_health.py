"""Public ``/api/health`` tells load balancers and Prometheus how things are, not where they are:
without an API key the checks carry status and latency only (no relay host:port, volume sizes,
backend URLs or error texts); any valid key sees the details."""

from __future__ import annotations

import json

import pytest

from tests.conftest import bearer, free_port


@pytest.mark.parametrize("service", ["sender", "importer", "exporter"])
async def test_public_health_hides_details_and_a_key_shows_them(service, client_for, make_key, settings):
    # Given a service whose relay and backends are at known (closed) addresses
    relay_port, backend_port = free_port(), free_port()
    _app, client = await client_for(service, smtp_host="127.0.0.1", smtp_port=relay_port,
                                    sender_url=f"http://127.0.0.1:{backend_port}",
                                    importer_url=f"http://127.0.0.1:{backend_port}",
                                    prometheus_url=f"http://127.0.0.1:{backend_port}",
                                    alertmanager_url=f"http://127.0.0.1:{backend_port}")
    key = await make_key("read")
    for path in ("/api/health", "/api/health/database"):
        # When health is asked without a key (or with a bogus one)
        for headers in ({}, bearer("mg_00000000_" + "x" * 43)):
            body = await (await client.get(path, headers=headers)).json()
            text = json.dumps(body)
            # Then every check has its status and no detail, and no address or size leaks
            assert body["checks"] and all(c["status"] and c["detail"] == "" for c in body["checks"].values()), body
            for leak in (str(relay_port), str(backend_port), "127.0.0.1", "GiB", settings.upload_dir):
                assert leak not in text, (path, leak, text)
        # And with a valid key the details are there
        body = await (await client.get(path, headers=bearer(key))).json()
        assert any(c["detail"] for c in body["checks"].values()), body
