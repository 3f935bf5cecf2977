"""The monitoring page in a real browser (Debian chromium driven by Playwright) against the real
exporter process, Prometheus and Alertmanager, after a scripted workload.

One scenario, in order: log in, every section populated, a number changing without a reload,
log filters, CSV and NDJSON downloads, screenshots at 1280 px and at phone width (saved under
test-artifacts/monitoring_page/), then Prometheus and Alertmanager stopped: the page says
"Prometheus unreachable" and keeps working.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import subprocess
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
import redis

from exporter.monitoring_page.routes import BASE
from mailgenius.broker import build_broker
from mailgenius.logstream import RedisStreamHandler, stream_key
from mailgenius.worker import enqueue
from tests.conftest import TABLES
from tests.stack import (
    ALERTMANAGER,
    PROMETHEUS,
    ROOT,
    VENV_BIN,
    Stack,
    require_binaries,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts" / "monitoring_page"

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def stack(settings, tmp_path):
    s = Stack(settings, tmp_path)
    yield s
    # graceful stops are not under test here (the stack suites test them): save the waits
    for name in list(s.procs):
        s.stop(name, kill=True)


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `scripts/setup.sh --test` installs the Debian chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _api_key(stack: Stack, scopes: str) -> str:
    """A key made the operator's way: `mailgenius apikey create` (the key is the last line)."""
    out = subprocess.run([str(VENV_BIN / "mailgenius"), "apikey", "create", "--scopes", scopes,
                          "--name", "page-test"], env=stack.env(), capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout.strip().splitlines()[-1]


def _write_configs(stack: Stack, tmp: Path) -> tuple[Path, Path]:
    rules = tmp / "page-rules.yml"
    rules.write_text(textwrap.dedent("""\
        groups:
          - name: page-test
            interval: 1s
            rules:
              - alert: MonitoringPageProbe
                expr: vector(1)
                labels: {severity: warning, service: exporter}
                annotations: {summary: "probe alert of the monitoring page test"}
        """))
    am = tmp / "alertmanager.yml"
    am.write_text(textwrap.dedent(f"""\
        route:
          receiver: exporter
          group_wait: 1s
          group_interval: 1s
          repeat_interval: 1h
        receivers:
          - name: exporter
            webhook_configs:
              - url: {stack.url("exporter")}/api/alerts/webhook
                send_resolved: true
        """))
    return rules, am


def _get(url: str, key: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _post_json(url: str, key: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _get_json(url: str, key: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _upload(url: str, key: str, text: str) -> int:
    """POST a CSV as multipart/form-data (field ``file``); returns the import id."""
    boundary = "pagetest" + os.urandom(8).hex()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"page-leads.csv\"\r\n"
            f"Content-Type: text/csv\r\n\r\n{text}\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 202
        return json.loads(resp.read())["id"]


def _log_warnings(settings, records) -> None:
    handler = RedisStreamHandler(settings.redis_url, stream_key(settings.redis_prefix), "x")
    try:
        for service, level, message in records:
            handler.service = service
            handler.emit(logging.LogRecord(f"{service}.workload", level, __file__, 1, message, None, None))
        assert handler.flush(5)
    finally:
        handler.close()


def _in_thread(coro_fn):
    """Run a coroutine on a fresh loop in another thread (Playwright's sync API runs a loop here)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro_fn()).result()


def _clean_slate(settings) -> None:
    """The session's database and Redis prefix are shared with the other suites: start this
    scenario from empty tables, queues and log stream so that every figure is this workload's."""
    async def truncate():
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    _in_thread(truncate)
    with redis.Redis.from_url(settings.redis_url) as r:
        for key in r.scan_iter(match=f"{settings.redis_prefix}*", count=1000):
            r.delete(key)


def _insert_running_import(database_url: str) -> None:
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                """INSERT INTO imports (status, filename, total_rows, processed_rows, inserted, invalid, started_at)
                   VALUES ('running', 'page-test-leads.csv', 50000, 12000, 11950, 50, now() - interval '30 seconds')""")
            # and a campaign a guard-rail paused (sender/guardrails.py), shown with its reason
            await conn.execute(
                """INSERT INTO campaigns (name, subject, from_email, status, recipients, sent, complained,
                                          pause_reason, auto_paused_at)
                   VALUES ('Spring <sale>', 's', 'n@example.com', 'paused', 2000, 1000, 3,
                           'complaint_rate: 3 complaints of 1000 sent (0.30 %) >= 0.30 %', now())""")
        finally:
            await conn.close()

    _in_thread(run)


def wait_js(page, expr: str, timeout: float = 10_000) -> None:
    """Poll a JS expression until truthy. (Playwright's wait_for_function compiles its predicate
    with eval, which the page's strict CSP forbids; page.evaluate is not subject to it.)"""
    deadline = time.monotonic() + timeout / 1000
    while True:
        if page.evaluate(expr):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout / 1000:g}s waiting for: {expr}")
        page.wait_for_timeout(100)


def _text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text().strip()


def test_monitoring_page_in_a_browser(stack, browser, settings, tmp_path):
    require_binaries(PROMETHEUS, ALERTMANAGER)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Given the exporter, Prometheus (scraping it every second, with a rule that always fires)
    # and Alertmanager (sending to the exporter's incident webhook)
    rules, am_config = _write_configs(stack, tmp_path)
    _clean_slate(settings)
    # and the sender (API, worker, local SMTP sink) and the importer (API, worker) for real work
    stack.start_sink()
    stack.start_worker("sender", wait=False)
    stack.start_worker("importer", wait=False)
    stack.start_service("sender")
    stack.start_service("importer")
    stack.start_service("exporter")
    stack.start_alertmanager(am_config)
    stack.wait_http("sender-worker", "/", timeout=60)
    stack.wait_http("importer-worker", "/", timeout=60)
    stack.start_prometheus(rule_files=[str(rules)], extra_args=("--rules.alert.resend-delay=1s",))
    key = _api_key(stack, "read")
    sender_key = _api_key(stack, "send")
    import_key = _api_key(stack, "import")

    # And a scripted workload: API traffic, queued messages (no worker), an import in progress,
    # warnings and errors from several services
    exporter = stack.url("exporter")
    for _ in range(15):
        assert _get(f"{exporter}/api/queue/status", key) == 200
        assert _get(f"{exporter}/api/incidents", key) == 200
    assert _get(f"{exporter}/api/queue/admin", key) == 405
    stack.wait_targets_up()  # every counter scraped at 0 first, so increase() sees the workload
    for i in range(6):
        assert _post_json(f"{stack.url('sender')}/api/emails", sender_key, {
            "to": f"customer{i}@example.com", "from_email": "Shop <shop@example.com>",
            "subject": f"Receipt {i}", "text": "Thanks"}) == 202
    # a real import: 300 rows, 3 of them invalid; then its worker stops, so that the probe
    # messages below stay waiting on lead-import
    csv_rows = ["email,first_name"] + [f"lead{i}@example.com,Lead {i}" for i in range(297)]
    csv_rows += ["not-an-email,Bad", ",Missing", "x@,Broken"]
    import_id = _upload(f"{stack.url('importer')}/api/upload", import_key, "\n".join(csv_rows) + "\n")
    wait_until(lambda: _get_json(f"{stack.url('importer')}/api/imports/{import_id}", key)["status"] == "completed",
               40, what="the import to complete\n" + stack.log("importer-worker"))
    wait_until(lambda: stack.prom_query("sum(mailgenius_import_rows_total) >= 300"), 20,
               what="the import's rows scraped from its worker")
    stack.stop("importer-worker", kill=True)
    broker = build_broker(settings)
    for i in range(5):
        enqueue(broker, "lead-import", "import_leads_probe", i)
    _insert_running_import(settings.database_url)
    _log_warnings(settings, [
        ("sender", logging.WARNING, "provider latency high: 2.4 s"),
        ("importer", logging.ERROR, "=cmd|' /C calc'!A0 rejected row 17"),
        ("sender-worker", logging.ERROR, "SMTP relay refused the connection"),
        ("importer-worker", logging.WARNING, "batch 3 retried"),
    ])
    stack.wait_targets_up()
    wait_until(lambda: stack.alerts(), 30, what="the probe alert in Alertmanager")
    wait_until(lambda: stack.prom_query("sum(mailgenius_queue_messages{state=\"waiting\"}) >= 5"), 30,
               what="queue depth scraped")
    wait_until(lambda: stack.prom_query("sum(mailgenius_emails_sent_total) >= 6"), 40,
               what="6 emails sent by the worker\n" + stack.log("sender-worker"))

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        # When the operator signs in with the login form
        page.goto(f"{exporter}{BASE}")
        page.fill("#key", "mg_wrong_key")
        page.click("#login-form button[type=submit]")
        assert "not valid" in _text(page, "#login-error")
        page.screenshot(path=str(ARTIFACTS / "login-refused.png"))
        page.fill("#key", key)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#sec-health")
        assert page.url == f"{exporter}{BASE}"
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies["mg_monitoring_session"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert key not in page.content()

        # Then every section is populated
        wait_js(page, "document.querySelectorAll('#health-table tbody tr[data-check]').length >= 4")
        assert "database" in _text(page, "#health-table")
        assert _text(page, "#overall").startswith(("✔", "▲", "✖"))  # icon + word, not colour alone
        wait_js(page,
            "document.querySelector('#queues-table tr[data-queue=\"lead-import\"] [data-field=waiting]')?.textContent === '5'")
        page.wait_for_selector("#imports-table tr[data-import]")
        assert "page-test-leads.csv" in _text(page, "#imports-table")
        done = page.locator(f'#imports-table tr[data-import="{import_id}"]')
        assert "page-leads.csv" in done.inner_text() and "completed" in done.inner_text()
        assert done.locator("td").last.inner_text().strip() == "3"  # the invalid rows
        page.wait_for_selector('[data-chart="import_rows"][data-state="drawn"] .uplot', timeout=20_000)
        wait_js(page, "document.querySelector('[data-stat=import_invalid_ratio]').textContent !== '—'",
                timeout=20_000)
        assert _text(page, "[data-stat=import_invalid_ratio]") == "1.00 %"
        page.wait_for_selector("#alerts-list li[data-alert=MonitoringPageProbe]", timeout=20_000)
        page.wait_for_selector("#incidents-table tbody tr:not(:has(.empty))", timeout=20_000)
        assert "MonitoringPageProbe" in _text(page, "#incidents-table")
        page.wait_for_selector("#summary .summary-grid")
        paused = _text(page, "#summary [data-auto-paused] li[data-campaign]")
        assert "Spring <sale>" in paused and "complaint_rate: 3 complaints of 1000 sent" in paused
        for message in ("provider latency high", "rejected row 17", "SMTP relay refused", "batch 3 retried"):
            page.wait_for_selector(f"#logs-table tr[data-log-id] >> text={message}")
        page.wait_for_selector('[data-chart="api_traffic"][data-state="drawn"] .uplot', timeout=20_000)
        page.wait_for_selector('[data-chart="queue_depth"][data-state="drawn"] .uplot', timeout=20_000)
        wait_js(page, "document.querySelector('[data-stat=request_rate]').textContent !== '—'",
                               timeout=20_000)
        page.wait_for_selector('[data-chart="email_throughput"][data-state="drawn"] .uplot', timeout=20_000)
        wait_js(page, "document.querySelector('[data-stat=emails_sent]').textContent !== '—'", timeout=20_000)
        # increase() extrapolates a little past the last sample: 6 sent reads as 6 or 7
        assert int(_text(page, "[data-stat=emails_sent]")) in (6, 7)
        for section in ("#sec-email", "#sec-imports", "#sec-api"):
            assert page.locator(f"{section} .chart[data-state]").count() >= 1, section
        assert not page.locator("#banners .banner").count(), _text(page, "#banners")

        # And a number changes without a reload
        page.evaluate("window.__sameDocument = 'yes'")
        polls_before = int(page.get_attribute("body", "data-polls"))
        for i in range(7):
            enqueue(broker, "lead-import", "import_leads_probe", 100 + i)
        wait_js(page,
            "document.querySelector('#queues-table tr[data-queue=\"lead-import\"] [data-field=waiting]').textContent === '12'",
            timeout=15_000)
        assert page.evaluate("window.__sameDocument") == "yes"
        assert int(page.get_attribute("body", "data-polls")) > polls_before

        # And new log records appear live; the filters narrow them
        _log_warnings(settings, [("exporter", logging.CRITICAL, "collector leads failed 3 times")])
        page.wait_for_selector("#logs-table tr[data-log-id] >> text=collector leads failed", timeout=15_000)
        rows = "document.querySelectorAll('#logs-table tr[data-log-id]')"
        filters = "document.querySelector('#logs-table').dataset.filters"
        # (real processes may add their own records: the checks look at what each filter keeps)
        page.select_option("#log-service", "sender-worker")
        wait_js(page, f"{filters} === 'service=sender-worker' && {rows}.length >= 1"
                f" && [...{rows}].every(r => r.dataset.service === 'sender-worker')")
        assert "SMTP relay refused" in _text(page, "#logs-table tbody")
        assert "rejected row 17" not in _text(page, "#logs-table tbody")
        page.select_option("#log-service", "")
        page.select_option("#log-level", "critical")
        wait_js(page, f"{filters} === 'level=critical' && {rows}.length >= 1"
                f" && [...{rows}].every(r => r.dataset.level === 'critical')")
        assert "collector leads failed" in _text(page, "#logs-table tbody")
        page.select_option("#log-level", "")
        page.fill("#log-q", "calc")
        wait_js(page, f"{filters} === 'q=calc' && {rows}.length === 1")
        assert "rejected row 17" in _text(page, "#logs-table tbody")

        # And the filtered records download as CSV (formula-safe) and as NDJSON
        with page.expect_download() as dl:
            page.click("#export-csv")
        csv_path = ARTIFACTS / "logs.csv"
        dl.value.save_as(csv_path)
        assert dl.value.suggested_filename.endswith(".csv")
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
        assert [r["message"] for r in rows] == ["'=cmd|' /C calc'!A0 rejected row 17"]
        page.fill("#log-q", "")
        with page.expect_download() as dl:
            page.click("#export-ndjson")
        nd_path = ARTIFACTS / "logs.ndjson"
        dl.value.save_as(nd_path)
        records = [json.loads(line) for line in nd_path.read_text().splitlines()]
        assert {r["service"] for r in records} >= {"sender", "importer", "sender-worker", "importer-worker", "exporter"}
        assert {"provider latency high: 2.4 s", "batch 3 retried"} <= {r["message"] for r in records}

        with page.expect_download() as dl:
            page.click("#export-series")
        series = json.loads(Path(dl.value.path()).read_text())
        assert series["ok"] and {c["id"] for c in series["charts"]} >= {"api_latency", "queue_depth", "email_throughput"}

        # And the page reads well at 1280 px and at phone width (screenshots are test artefacts)
        page.screenshot(path=str(ARTIFACTS / "desktop-1280.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"page scrolls sideways at phone width by {overflow}px"
        page.screenshot(path=str(ARTIFACTS / "phone-390.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})

        # When Prometheus and Alertmanager go down
        stack.stop("prometheus")
        stack.stop("alertmanager")
        # Then the page says so instead of breaking, and the rest keeps updating
        page.wait_for_selector("#banners .banner >> text=Prometheus unreachable", timeout=20_000)
        page.wait_for_selector("#banners .banner >> text=Alertmanager unreachable", timeout=20_000)
        page.wait_for_selector('[data-chart="api_latency"][data-state="unreachable"]')
        for i in range(3):
            enqueue(broker, "lead-import", "import_leads_probe", 200 + i)
        wait_js(page,
            "document.querySelector('#queues-table tr[data-queue=\"lead-import\"] [data-field=waiting]').textContent === '15'",
            timeout=15_000)
        assert page.evaluate("window.__sameDocument") == "yes"
        # And a real worker's warning arrives through the log stream: the SMTP sink goes away,
        # the sender worker's next send fails and it logs that it will retry
        stack.stop("sink")
        assert _post_json(f"{stack.url('sender')}/api/emails", sender_key, {
            "to": "late@example.com", "from_email": "shop@example.com", "subject": "Late", "text": "x"}) == 202
        page.wait_for_selector('#logs-table tr[data-service="sender-worker"][data-level="warning"]'
                               ' >> text=provider call to retry', timeout=20_000)
        page.screenshot(path=str(ARTIFACTS / "backends-down.png"), full_page=True)

        # And signing out ends the session
        page.click("header form button[type=submit]")
        page.wait_for_selector("#login-form")
        assert _get(f"{exporter}/api/queue/status", "") == 401
    finally:
        context.close()
    assert not [e for e in console_errors if "401" not in e], console_errors
