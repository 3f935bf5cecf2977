"""Transactional email, email settings and the shared rate limit, DNS authentication check,
health checks, and the SMTP provider against the local sink."""

from __future__ import annotations

import asyncio
import time

import pytest

from sender.email_settings import RateLimiter
from sender.providers import OutEmail, SmtpProvider
from sender.sending import send_transactional
from sender.sink import start_sink
from tests.conftest import bearer, free_port

from .dns_server import TxtServer

EMAIL = {"to": "buyer@example.com", "from_email": "Shop <shop@example.com>", "subject": "Your receipt",
         "html": "<p>Thanks</p>", "text": "Thanks"}


async def test_transactional_email_idempotency_key(api, pool, send_ctx, fake_resend):
    h = {**api.h, "Idempotency-Key": "order-42"}
    r1 = await api.post("/api/emails", json=EMAIL, headers=h)
    assert r1.status == 202, await r1.text()
    first = await r1.json()
    # the same key and body: the same message, nothing new
    r2 = await api.post("/api/emails", json=EMAIL, headers=h)
    assert r2.status == 202 and (await r2.json())["id"] == first["id"]
    assert (await r2.json())["idempotent_replay"] is True
    # the same key with another body: 409
    r3 = await api.post("/api/emails", json={**EMAIL, "subject": "other"}, headers=h)
    assert r3.status == 409 and (await r3.json())["error"]["code"] == "idempotency_key_reused"
    assert await pool.fetchval("SELECT count(*) FROM messages") == 1
    # the worker sends it once, even when the job runs twice
    await send_transactional(send_ctx, first["id"])
    await send_transactional(send_ctx, first["id"])
    assert dict(fake_resend.counts) == {"buyer@example.com": 1}
    resp = await api.get(f"/api/emails/{first['id']}", headers=api.read_h)
    body = await resp.json()
    assert body["status"] == "sent" and body["provider"] == "resend"


@pytest.mark.parametrize("body", [
    {**EMAIL, "to": "not-an-email"}, {**EMAIL, "subject": ""}, {**EMAIL, "html": "", "text": ""},
    {**EMAIL, "cc": "x@example.com"}, [1, 2], {**EMAIL, "from_email": "x@example.com\nBcc: y@z.com"},
])
async def test_transactional_bad_input(api, body, pool):
    resp = await api.post("/api/emails", json=body, headers=api.h)
    assert resp.status == 422
    assert set((await resp.json())["error"]) >= {"code", "message"}
    assert await pool.fetchval("SELECT count(*) FROM messages") == 0


async def test_email_settings_get_put(api, pool):
    resp = await api.get("/api/settings/email", headers=api.read_h)
    assert await resp.json() == {"provider": "resend", "rate_limit": 0}
    resp = await api.put("/api/settings/email", json={"provider": "smtp", "rate_limit": 250}, headers=api.h)
    assert resp.status == 200 and await resp.json() == {"provider": "smtp", "rate_limit": 250}
    assert await (await api.get("/api/settings/email", headers=api.read_h)).json() == {"provider": "smtp", "rate_limit": 250}
    for bad in ({"provider": "mailchimp"}, {"rate_limit": -1}, {"rate_limit": "fast"}, {"rate_limit": True}, {"x": 1}):
        resp = await api.put("/api/settings/email", json=bad, headers=api.h)
        assert resp.status == 422, bad
    # writes need the admin scope
    assert (await api.put("/api/settings/email", json={"rate_limit": 1}, headers=api.read_h)).status == 403


async def test_rate_limit_shared_in_redis_and_changed_live(api, ssettings, redis_client):
    # Given a rate limit of 200 emails/s set through the API
    await api.put("/api/settings/email", json={"rate_limit": 200}, headers=api.h)
    limiters = [RateLimiter(redis_client, ssettings) for _ in range(3)]  # three "workers"
    start = time.perf_counter()

    async def worker(lim):
        for _ in range(5):
            await lim.acquire(20)

    await asyncio.gather(*(worker(lim) for lim in limiters))
    elapsed = time.perf_counter() - start
    # 300 emails at 200/s: the first 20 go at once, the other 280 take 1.4 s
    assert 1.3 <= elapsed <= 1.9, elapsed
    # When the limit is lifted, Then the next acquisitions do not wait
    await api.put("/api/settings/email", json={"rate_limit": 0}, headers=api.h)
    start = time.perf_counter()
    for _ in range(10):
        await limiters[0].acquire(100)
    assert time.perf_counter() - start < 0.5


async def test_dns_authentication_check(ssettings):
    records = {
        "good.test": ["v=spf1 include:_spf.resend.com ~all", "google-site-verification=abc"],
        "default._domainkey.good.test": ["v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC" + "A" * 300],
        "_dmarc.good.test": ["v=DMARC1; p=reject; rua=mailto:d@good.test"],
        "bad.test": ["v=spf1 +all"],
        "_dmarc.bad.test": ["v=DMARC1; p=none"],
    }
    with TxtServer(records) as dns_srv:
        from sender import dnsauth

        app_settings = ssettings.replace(dns_resolver="127.0.0.1", dns_port=dns_srv.port)
        good = await dnsauth.test_authentication(app_settings, {"domain": "good.test"})
        assert good["ok"] is True
        assert good["spf"]["status"] == "pass" and good["dkim"]["status"] == "pass" and good["dmarc"]["status"] == "pass"
        bad = await dnsauth.test_authentication(app_settings, {"domain": "bad.test", "dkim_selector": "s1"})
        assert bad["ok"] is False
        assert bad["spf"]["status"] == "fail" and bad["dkim"]["status"] == "missing" and bad["dmarc"]["status"] == "warn"
        assert "s1._domainkey.bad.test" in dns_srv.queries


async def test_dns_authentication_endpoint(aiohttp_client, ssettings, pool, make_key):
    from prometheus_client import CollectorRegistry

    from sender.app import create_app
    from tests.conftest import bearer

    with TxtServer({"x.test": ["v=spf1 -all"]}) as dns_srv:
        client = await aiohttp_client(create_app(ssettings.replace(dns_resolver="127.0.0.1", dns_port=dns_srv.port),
                                                 registry=CollectorRegistry()))
        h = bearer(await make_key("send"))
        resp = await client.post("/api/email/test-authentication", json={"domain": "x.test"}, headers=h)
        assert resp.status == 200
        body = await resp.json()
        assert body["spf"]["status"] == "pass" and body["dkim"]["status"] == "missing"
        for bad in ({"domain": "not a domain"}, {"domain": "x.test", "dkim_selector": "../etc"}, {}):
            resp = await client.post("/api/email/test-authentication", json=bad, headers=h)
            assert resp.status == 422


async def test_health_checks(api, pool, make_key):
    # the details are for key holders (a public /api/health shows statuses only)
    h = bearer(await make_key("read"))
    resp = await api.get("/api/health", headers=h)
    body = await resp.json()
    assert set(body["checks"]) >= {"database", "redis", "queue", "email", "workers"}
    assert body["checks"]["email"]["status"] == "healthy", body["checks"]["email"]
    assert "fake-resend" not in body["checks"]["email"]["detail"]
    # no worker runs in this test (earlier tests may have left messages waiting: then unhealthy)
    assert body["checks"]["workers"]["status"] in ("degraded", "unhealthy")
    assert "no live worker" in body["checks"]["workers"]["detail"]
    resp = await api.get("/api/health/email")
    assert resp.status == 200


async def test_email_health_degraded_when_provider_unreachable(aiohttp_client, ssettings, pool):
    from prometheus_client import CollectorRegistry

    from sender.app import create_app

    dead = ssettings.replace(resend_base_url=f"http://127.0.0.1:{free_port()}")
    client = await aiohttp_client(create_app(dead, registry=CollectorRegistry()))
    resp = await client.get("/api/health/email")
    body = await resp.json()
    assert body["checks"]["email"]["status"] == "degraded"


async def test_smtp_provider_against_the_sink_reuses_connections():
    port = free_port()
    controller, handler = start_sink("127.0.0.1", port)
    try:
        p = SmtpProvider("127.0.0.1", port, pool_size=2)
        emails = [OutEmail(i, f"r{i}@example.com", "a@example.com", f"s{i}", "<p>h</p>", "t",
                           {"List-Unsubscribe": "<http://x/u/1>"}) for i in range(1, 11)]
        res = await p.send_batch(emails, "k")
        assert sorted(res.accepted) == list(range(1, 11)) and not res.retry and not res.rejected
        assert handler.received == 10
        assert p.pool.peak <= 2 and p.pool.open <= 2  # at most pool_size connections were opened
        raw = handler.messages[0][2]
        assert b"List-Unsubscribe" in raw and b"multipart/alternative" in raw
        await p.close()
    finally:
        controller.stop()
    # the relay is gone: every email is to retry, none lost
    res = await SmtpProvider("127.0.0.1", port).send_batch(emails[:2], "k")
    assert sorted(res.retry) == [1, 2] and res.error.reason in ("connection", "timeout")


async def test_openapi_lists_the_sender_contract(api):
    doc = await (await api.get("/api/openapi.json")).json()
    paths = doc["paths"]
    for path, method in [("/api/campaigns", "post"), ("/api/campaigns/{id}", "get"),
                         ("/api/campaigns/{id}/send", "post"), ("/api/campaigns/{id}/pause", "post"),
                         ("/api/campaigns/{id}/resume", "post"), ("/api/campaigns/{id}/cancel", "post"),
                         ("/api/campaigns/retry-failed", "post"), ("/api/emails", "post"),
                         ("/api/settings/email", "get"), ("/api/settings/email", "put"),
                         ("/api/email/test-authentication", "post"), ("/webhooks/resend", "post"),
                         ("/t/o/{token}", "get"), ("/t/c/{token}", "get"), ("/u/{token}", "get"), ("/u/{token}", "post")]:
        assert method in paths.get(path, {}), (path, method)
    assert "security" in paths["/api/campaigns"]["post"]
    assert "security" not in paths["/webhooks/resend"]["post"]
    assert paths["/api/campaigns"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "name", "subject", "from_email"]
