"""Signing in to the monitoring page: never with a key in the URL; the form works behind an HTTPS
proxy (Origin checked against MAILGENIUS_PUBLIC_URL, ``Origin: null`` refused, ``Secure``
cookie); failed sign-ins are counted per client, read from X-Forwarded-For only when the peer is a
trusted proxy (MAILGENIUS_TRUSTED_PROXIES)."""

from __future__ import annotations

import ipaddress

import pytest

from exporter.monitoring_page import routes, sessions, setup_monitoring_page
from exporter.monitoring_page.routes import BASE
from mailgenius.keys import REDIS
from mailgenius.settings import SettingsError, load_settings
from mailgenius.web import base_app
from tests.conftest import free_port


@pytest.fixture
async def page_for(aiohttp_client, settings, pool):
    async def make(**changes):
        s = settings.replace(prometheus_url=f"http://127.0.0.1:{free_port()}",
                             alertmanager_url=f"http://127.0.0.1:{free_port()}", **changes)
        app = base_app(s, "exporter")
        setup_monitoring_page(app)
        client = await aiohttp_client(app)
        async for k in app[REDIS].scan_iter(match=f"{s.redis_prefix}:page-login-failures:*"):
            await app[REDIS].delete(k)
        return client
    return make


async def test_a_key_in_the_url_does_not_sign_in(page_for, make_key):
    client = await page_for()
    key = await make_key("read", "admin")
    # When the page is opened with a valid admin key in the address
    resp = await client.get(BASE, params={"key": key}, allow_redirects=False)
    # Then no session is made: a clear refusal, no cookie, and the page still asks to sign in
    assert resp.status == 400
    assert "not accepted" in await resp.text()
    assert "Set-Cookie" not in resp.headers
    page = await client.get(BASE)
    assert 'name="key"' in await page.text()


async def test_form_sign_in_works_behind_an_https_proxy_with_a_secure_cookie(page_for, make_key):
    # Given the page behind a TLS-terminating proxy at https://monitor.example.com
    client = await page_for(public_url="https://monitor.example.com")
    key = await make_key("read")
    # When the browser posts the form (Origin https://monitor.example.com; the proxy forwards
    # the Host, and the request reaches us over plain http)
    resp = await client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False,
                             headers={"Origin": "https://monitor.example.com", "Host": "monitor.example.com"})
    # Then the operator is signed in, with a Secure cookie
    assert resp.status == 303, await resp.text()
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith(f"{sessions.COOKIE}=") and "Secure" in cookie


async def test_plain_http_cookie_is_not_secure_and_same_origin_still_works(page_for, make_key):
    client = await page_for()
    key = await make_key("read")
    origin = f"http://{client.host}:{client.port}"
    resp = await client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False, headers={"Origin": origin})
    assert resp.status == 303, await resp.text()
    assert "Secure" not in resp.headers["Set-Cookie"]


@pytest.mark.parametrize("origin", ["null", "https://evil.example", "http://monitor.example.com.evil.example"])
async def test_foreign_and_null_origins_are_refused(page_for, make_key, origin):
    client = await page_for(public_url="https://monitor.example.com")
    key = await make_key("read")
    resp = await client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False, headers={"Origin": origin})
    assert resp.status == 403, await resp.text()
    assert (await resp.json())["error"]["code"] == "forbidden"
    assert "Set-Cookie" not in resp.headers


async def _fail(client, xff: str | None):
    headers = {"X-Forwarded-For": xff} if xff else {}
    return await client.post(f"{BASE}/login", data={"key": "mg_bad_guess"}, headers=headers)


async def test_throttle_counts_the_forwarded_client_behind_a_trusted_proxy(page_for, make_key, monkeypatch):
    # Given the page behind a trusted proxy on loopback (the test client's address)
    monkeypatch.setattr(routes, "LOGIN_FAILURES_ALLOWED", 3)
    client = await page_for(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    key = await make_key("read")
    # When one client behind it fails three times
    for _ in range(3):
        assert (await _fail(client, "203.0.113.5")).status == 401
    # Then that client must wait, even spoofing a left-most hop...
    assert (await _fail(client, "198.51.100.9, 203.0.113.5")).status == 429
    # ...but another operator behind the same proxy signs in
    resp = await client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False,
                             headers={"X-Forwarded-For": "198.51.100.7"})
    assert resp.status == 303, await resp.text()


async def test_x_forwarded_for_is_ignored_from_an_untrusted_peer(page_for, monkeypatch):
    # Given no trusted proxy: the socket peer is the client, whatever the header says
    monkeypatch.setattr(routes, "LOGIN_FAILURES_ALLOWED", 3)
    client = await page_for(trusted_proxies=(ipaddress.ip_network("10.9.9.0/24"),))
    # When a guesser rotates X-Forwarded-For on every attempt
    for i in range(3):
        assert (await _fail(client, f"192.0.2.{i}")).status == 401
    # Then it is still throttled as itself
    assert (await _fail(client, "192.0.2.200")).status == 429


def test_trusted_proxies_setting_names_the_variable_when_bad():
    assert load_settings({"MAILGENIUS_TRUSTED_PROXIES": "10.0.0.0/8, ::1"}).trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    with pytest.raises(SettingsError) as exc:
        load_settings({"MAILGENIUS_TRUSTED_PROXIES": "10.0.0.0/8,proxy.local"})
    assert exc.value.variable == "MAILGENIUS_TRUSTED_PROXIES"


async def test_pages_use_a_referrer_policy_under_which_the_form_origin_is_sent(page_for):
    # under `no-referrer` browsers send `Origin: null` with the page's own form posts, which
    # the sign-in refuses: the policy must keep same-origin referrers (and give other sites none)
    client = await page_for()
    resp = await client.get(BASE)
    assert resp.headers["Referrer-Policy"] == "same-origin"
    assert '<meta name="referrer" content="same-origin">' in await resp.text()
