"""The monitoring page's server side: login and sessions, its JSON endpoints, log export, and
how it behaves when Prometheus / Alertmanager are down. Real Postgres and Redis."""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import pytest

from exporter.monitoring_page import sessions
from exporter.monitoring_page.routes import API, BASE
from mailgenius import auth
from mailgenius import keys as kk
from mailgenius.logstream import RedisStreamHandler, stream_key
from tests.monitoring_page.conftest import login

# -- login and sessions -------------------------------------------------------------------------

async def test_without_session_the_page_is_a_login_form(page_client):
    resp = await page_client.get(BASE)
    assert resp.status == 200
    html = await resp.text()
    assert 'action="/dashboard/monitoring/login"' in html and 'name="key"' in html
    assert "Content-Security-Policy" in resp.headers
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]


async def test_key_exchange_sets_a_strict_httponly_cookie_and_drops_the_key(page_client, make_key):
    key = await make_key("read")
    # When the operator signs in with the form
    resp = await page_client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False)
    # Then they are sent to the bare address with a session cookie
    assert resp.status == 303
    assert resp.headers["Location"] == BASE
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith(f"{sessions.COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert key not in cookie
    assert resp.headers["Referrer-Policy"] == "same-origin"  # no-referrer makes the form's Origin null
    # And the page itself carries no key material and no inline script
    page = await page_client.get(BASE)
    html = await page.text()
    assert page.status == 200
    assert 'id="sec-health"' in html and 'id="sec-logs"' in html
    assert key not in html and key.split("_")[1] not in html
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script found"
    # And the session lives in Redis with an expiry, keyed by a hash (not the token itself)
    token = page_client.session.cookie_jar.filter_cookies(page_client.make_url("/"))[sessions.COOKIE].value
    redis = page_client.app[kk.REDIS]
    stored = await redis.get(sessions._session_key(page_client.app[kk.SETTINGS], token))
    assert stored is not None and key.encode() not in stored and token.encode() not in stored
    ttl = await redis.ttl(sessions._session_key(page_client.app[kk.SETTINGS], token))
    assert 0 < ttl <= sessions.SESSION_TTL


@pytest.mark.parametrize("bad", ["mg_nope_nope", "", "x" * 500])
async def test_invalid_key_is_refused_with_a_clear_message(page_client, bad):
    resp = await page_client.post(f"{BASE}/login", data={"key": bad}, allow_redirects=False)
    assert resp.status == 401
    html = await resp.text()
    assert "not valid" in html
    assert "Set-Cookie" not in resp.headers


async def test_login_form_post_and_logout(page_client, make_key):
    key = await make_key("read")
    resp = await page_client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False)
    assert resp.status == 303 and sessions.COOKIE in resp.headers["Set-Cookie"]
    assert (await page_client.get(f"{API}/logs")).status == 200
    resp = await page_client.post(f"{BASE}/logout", allow_redirects=False)
    assert resp.status == 303
    # the cookie is gone and the session too
    resp = await page_client.get(f"{API}/logs")
    assert resp.status == 401


async def test_repeated_failed_logins_are_slowed_down(page_client, make_key, monkeypatch):
    from exporter.monitoring_page import routes

    monkeypatch.setattr(routes, "LOGIN_FAILURES_ALLOWED", 3)
    key = await make_key("read")
    for _ in range(3):
        assert (await page_client.post(f"{BASE}/login", data={"key": "mg_bad_guess"})).status == 401
    # the 4th attempt is refused before the key is even looked at, the right key included
    resp = await page_client.post(f"{BASE}/login", data={"key": key}, allow_redirects=False)
    assert resp.status == 429 and resp.headers["Retry-After"] == str(routes.LOGIN_FAILURE_WINDOW)
    assert "Too many failed sign-ins" in await resp.text()
    assert "Set-Cookie" not in resp.headers


@pytest.mark.parametrize("headers, data, status", [
    ({"Content-Type": "multipart/form-data"}, b"key=x", 400),      # no boundary
    ({"Content-Type": "application/json"}, b'{"key": "x"}', 415),
])
async def test_malformed_login_bodies_get_a_clear_error(page_client, headers, data, status):
    resp = await page_client.post(f"{BASE}/login", data=data, headers=headers)
    assert resp.status == status
    assert (await resp.json())["error"]["message"]


async def test_cross_origin_login_post_is_refused(page_client, make_key):
    key = await make_key("read")
    resp = await page_client.post(f"{BASE}/login", data={"key": key}, headers={"Origin": "http://evil.example"},
                                  allow_redirects=False)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "forbidden"


async def test_revoked_key_ends_the_session(page_client, make_key, pool, monkeypatch):
    monkeypatch.setattr(auth, "AUTH_CACHE_TTL", 0.0)
    key = await make_key("read")
    await login(page_client, key)
    assert (await page_client.get(f"{API}/imports")).status == 200
    async with pool.acquire() as conn:
        assert await auth.revoke_key(conn, key)
    resp = await page_client.get(f"{API}/imports")
    assert resp.status == 401
    page = await page_client.get(BASE)
    assert 'name="key"' in await page.text()


@pytest.mark.parametrize("path", ["/series", "/slos", "/alerts", "/imports", "/logs", "/logs/export"])
async def test_page_json_needs_a_session(page_client, path):
    resp = await page_client.get(API + path)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized" and body["error"]["message"]


async def test_index_links_to_the_page(page_client):
    html = await (await page_client.get("/")).text()
    assert f"href='{BASE}'" in html


async def test_static_files_are_local(page_client):
    html = await (await page_client.get(BASE)).text()
    for src in re.findall(r'(?:src|href)="([^"]+\.(?:js|css)[^"]*)"', html):
        assert src.startswith(f"{BASE}/static/"), src
        resp = await page_client.get(src)
        assert resp.status == 200, src
    assert "//" not in "".join(re.findall(r'(?:src|href)="([^"]+)"', html))


# -- Prometheus and Alertmanager down ------------------------------------------------------------

async def test_series_when_prometheus_is_down_says_so(page_client, make_key):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/series", params={"range": "24h"})
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is False and body["error"].startswith("Prometheus unreachable")
    assert body["charts"] == []


async def test_alerts_when_alertmanager_is_down_says_so(page_client, make_key):
    await login(page_client, await make_key("read"))
    body = await (await page_client.get(f"{API}/alerts")).json()
    assert body["ok"] is False and body["error"].startswith("Alertmanager unreachable")


async def test_series_range_is_an_allow_list(page_client, make_key):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/series", params={"range": "7d"})
    assert resp.status == 422
    resp = await page_client.get(f"{API}/series", params={"query": "up", "range": "1h"})
    assert resp.status == 200  # extra parameters are ignored: no PromQL from the browser


# -- logs ------------------------------------------------------------------------------------------

def _log_records(settings, records):
    handler = RedisStreamHandler(settings.redis_url, stream_key(settings.redis_prefix), "x")
    try:
        for service, level, message in records:
            handler.service = service
            handler.emit(logging.LogRecord("app.test", level, __file__, 1, message, None, None))
            assert handler.flush(5)
    finally:
        handler.close()


@pytest.fixture
async def logged_records(page_client, page_settings):
    redis = page_client.app[kk.REDIS]
    await redis.delete(stream_key(page_settings.redis_prefix))
    _log_records(page_settings, [
        ("sender", logging.WARNING, "provider slow: 2.1 s"),
        ("importer", logging.ERROR, "=HYPERLINK(\"http://x\") row rejected"),
        ("sender", logging.CRITICAL, "SMTP relay down"),
        ("importer-worker", logging.WARNING, "+retry batch 7"),
    ])


async def test_logs_filter_by_service_level_and_text(page_client, make_key, logged_records):
    await login(page_client, await make_key("read"))

    async def messages(**params):
        body = await (await page_client.get(f"{API}/logs", params=params)).json()
        return [e["message"] for e in body["entries"]]

    assert await messages() == ["provider slow: 2.1 s", '=HYPERLINK("http://x") row rejected',
                                "SMTP relay down", "+retry batch 7"]
    assert await messages(service="sender") == ["provider slow: 2.1 s", "SMTP relay down"]
    assert await messages(level="error") == ['=HYPERLINK("http://x") row rejected', "SMTP relay down"]
    assert await messages(level="critical") == ["SMTP relay down"]
    assert await messages(q="RELAY") == ["SMTP relay down"]
    assert await messages(service="sender", level="error", q="slow") == []


async def test_logs_after_returns_only_newer_entries(page_client, page_settings, make_key, logged_records):
    await login(page_client, await make_key("read"))
    body = await (await page_client.get(f"{API}/logs")).json()
    last = body["last_id"]
    again = await (await page_client.get(f"{API}/logs", params={"after": last})).json()
    assert again["entries"] == [] and again["last_id"] == last
    _log_records(page_settings, [("exporter", logging.ERROR, "collector failed")])
    newer = await (await page_client.get(f"{API}/logs", params={"after": last})).json()
    assert [e["message"] for e in newer["entries"]] == ["collector failed"]
    assert newer["last_id"] != last


@pytest.mark.parametrize("params, field", [
    ({"level": "debug"}, "level"), ({"service": "../etc"}, "service"), ({"after": "1; DROP"}, "after"),
    ({"limit": "0"}, "limit"), ({"limit": "abc"}, "limit"), ({"q": "x" * 201}, "q"),
])
async def test_bad_log_parameters_are_422(page_client, make_key, params, field):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/logs", params=params)
    assert resp.status == 422
    assert (await resp.json())["error"]["message"].startswith(field)


async def test_csv_export_escapes_formulas(page_client, make_key, logged_records):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/logs/export", params={"format": "csv", "service": "importer"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    assert re.match(r'attachment; filename="mailgenius-logs-\d{8}T\d{6}Z\.csv"', resp.headers["Content-Disposition"])
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["message"] for r in rows] == ['\'=HYPERLINK("http://x") row rejected']
    assert rows[0]["level"] == "error" and rows[0]["service"] == "importer"
    resp = await page_client.get(f"{API}/logs/export", params={"format": "csv", "q": "retry"})
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["message"] for r in rows] == ["'+retry batch 7"]


async def test_ndjson_export_keeps_values_verbatim(page_client, make_key, logged_records):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/logs/export", params={"format": "ndjson", "level": "error"})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [x["message"] for x in lines] == ['=HYPERLINK("http://x") row rejected', "SMTP relay down"]
    assert set(lines[0]) == {"ts", "level", "service", "logger", "message", "request_id", "id"}


async def test_export_format_is_checked(page_client, make_key):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/logs/export", params={"format": "xlsx"})
    assert resp.status == 422


# -- imports ---------------------------------------------------------------------------------------

async def test_imports_show_rate_eta_and_errors(page_client, make_key, pool):
    await login(page_client, await make_key("read"))
    await pool.execute(
        """INSERT INTO imports (status, filename, total_rows, processed_rows, inserted, invalid, started_at)
           VALUES ('running', 'leads.csv', 10000, 4000, 3990, 10, now() - interval '20 seconds'),
                  ('completed', 'old.csv', 100, 100, 100, 0, now() - interval '1 hour')""")
    await pool.execute("UPDATE imports SET finished_at = started_at + interval '10 seconds' WHERE status = 'completed'")
    body = await (await page_client.get(f"{API}/imports")).json()
    [running] = body["active"]
    assert running["filename"] == "leads.csv" and running["invalid"] == 10
    assert 150 < running["rows_per_second"] <= 200  # 4000 rows in ~20 s
    assert 25 < running["eta_seconds"] < 45          # 6000 rows left at ~200 rows/s
    [done] = body["recent"]
    assert done["rows_per_second"] == 10.0 and done["eta_seconds"] == 0.0 and done["progress"] == 1.0
    # the same figures as the importer's API gives for the same rows (one computation)
    from importer.jobs import IMPORT_FIELDS, view

    rows = {r["filename"]: r for r in await pool.fetch(
        f"SELECT {', '.join(IMPORT_FIELDS)}, extract(epoch FROM now()) AS now FROM imports")}
    api_done = view(rows["old.csv"])
    assert {k: done[k] for k in ("rows_per_second", "eta_seconds", "progress_percent")} == \
        {k: api_done[k] for k in ("rows_per_second", "eta_seconds", "progress_percent")}
    api_running = view(rows["leads.csv"], now=float(rows["leads.csv"]["now"]))
    assert running["progress_percent"] == api_running["progress_percent"] == 40.0
    assert abs(running["rows_per_second"] - api_running["rows_per_second"]) < 5


# -- the operator API with the page's session (kernel SESSION_AUTH hook) -----------------------

async def test_session_reads_the_operator_api_but_never_writes(aiohttp_client, page_settings, pool, make_key):
    from exporter.app import create_app

    client = await aiohttp_client(create_app(page_settings))
    # (the exporter's own index links to the page)
    assert f"href='{BASE}'" in await (await client.get("/")).text()
    # Given a browser session (no Authorization header)
    await login(client, await make_key("admin"))
    # Then it may read the operator API
    resp = await client.get("/api/queue/status")
    assert resp.status == 200, await resp.text()
    assert set((await resp.json())["queues"]) == {"email-sending", "lead-import"}
    assert (await client.get("/api/incidents")).status == 200
    # But a write is refused even though the key behind the session is admin
    resp = await client.post("/api/queue/admin", json={"action": "clear", "queue": "email-sending",
                                                        "type": "failed", "dry_run": True})
    assert resp.status == 401
    # And without a session the operator API still wants a key
    client.session.cookie_jar.clear()
    assert (await client.get("/api/queue/status")).status == 401
