"""End to end: the exporter as a real process (`mailgenius serve exporter`) scraped by a real
Prometheus, and a real Alertmanager delivering its webhook to it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import urllib.request
from pathlib import Path

import pytest

from mailgenius import contract
from mailgenius import metrics as m
from tests.conftest import bearer
from tests.stack import (
    ALERT_WEBHOOK_TOKEN,
    ALERTMANAGER,
    PROMETHEUS,
    Stack,
    http_get,
    require_binaries,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(exporter_settings, tmp_path, pool):
    require_binaries(PROMETHEUS, ALERTMANAGER)
    s = Stack(exporter_settings, tmp_path)
    yield s
    s.stop_all()


def start(stack: Stack) -> None:
    stack.start_service("exporter", MAILGENIUS_EXPORTER_REFRESH_SECONDS="0.5")
    am_config = stack.tmp / "alertmanager.yml"
    am_config.write_text(json.dumps({
        "route": {"receiver": "incidents", "group_by": ["alertname"], "group_wait": "0s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "incidents", "webhook_configs": [
            {"url": stack.url("exporter") + "/api/alerts/webhook", "send_resolved": True,
             "http_config": {"authorization": {"credentials": ALERT_WEBHOOK_TOKEN}}}]}],
    }))
    stack.start_alertmanager(am_config)
    # the recording rules: the summary shows their series (API p95, error rate, email rates)
    stack.start_prometheus(jobs={"exporter": stack.target("exporter")},
                           rule_files=[str(REPO / "prometheus" / "rules" / "recording.yml")])


def get_json(url: str, key: str | None = None):
    req = urllib.request.Request(url, headers=bearer(key) if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_prometheus_scrapes_the_kpis_and_the_summary_uses_it(stack, pool, make_key):
    # Given the exporter, Prometheus scraping it every second, and 1,234 leads (34 bounced)
    await pool.execute(
        """INSERT INTO leads (email, status) SELECT 'p' || g || '@example.com',
           CASE WHEN g <= 34 THEN 'bounced' ELSE 'active' END FROM generate_series(1, 1234) g""")
    start(stack)
    stack.start_service("sender")  # a real service whose own health the exporter relays
    key = await make_key("read")
    exporter = stack.url("exporter")

    # When Prometheus has scraped a few times while the operator API served requests
    def scraped():
        get_json(exporter + "/api/queue/status", key)
        res = stack.prom_query(f'{m.LEADS}{{status="active"}}')
        api = stack.prom_query(f'sum(increase({m.HTTP_REQUESTS}{{route="/api/queue/status"}}[1m]))')
        return res and res[0]["value"][1] == "1200" and api and float(api[0]["value"][1]) > 0

    wait_until(scraped, 30, what="Prometheus to scrape the exporter's KPIs")
    # Then the lead KPI in Prometheus equals ground truth
    bounced = stack.prom_query(f'{m.LEADS}{{status="bounced"}}')
    assert bounced[0]["value"][1] == "34"
    # and the HTTP series carry one service label, the job's (not a clashing exported_service)
    assert stack.prom_query('count({exported_service!=""})') == []
    services = stack.prom_query(f"count by (service) ({m.HTTP_REQUESTS})")
    assert {r["metric"]["service"] for r in services} == {"exporter"}
    wait_until(lambda: stack.prom_query(contract.get().series("api_latency_p95_all")), 30,
               what="the recorded API p95")

    # And the operator summary is computed from Prometheus
    status, body = get_json(exporter + "/api/monitoring/metrics", key)
    assert status == 200, body
    assert body["prometheus"]["reachable"] is True and body["prometheus"]["error"] is None
    assert body["api_latency"]["p50"] is not None and body["api_latency"]["p50"] > 0
    assert body["api_latency"]["p50"] <= body["api_latency"]["p95"] <= body["api_latency"]["p99"]
    assert body["request_rate"]["current"] > 0
    assert body["error_rate"]["current"] == 0
    assert body["lead_metrics"]["total_leads"] == 1234

    # And the aggregated health sees Prometheus and Alertmanager up
    status, health = get_json(exporter + "/api/health", key)
    assert health["checks"]["prometheus"]["status"] == "healthy", health
    assert health["checks"]["alertmanager"]["status"] == "healthy", health
    assert health["checks"]["database"]["status"] == "healthy"
    # and relays the sender's own verdict (whatever it is, it answered: not "unreachable")
    _, sender_health = get_json(stack.url("sender") + "/api/health")
    assert health["checks"]["sender"]["detail"].startswith(sender_health["status"]), (health, sender_health)
    assert health["checks"]["importer"]["status"] == "degraded"  # not started: unreachable


async def test_alertmanager_webhook_opens_and_resolves_an_incident(stack, pool):
    start(stack)
    am = stack.url("alertmanager")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    starts = now - dt.timedelta(seconds=90)

    def post_alert(ends: dt.datetime):
        alert = [{"labels": {"alertname": "QueueDepthHigh", "severity": "critical", "queue": "email-sending"},
                  "annotations": {"summary": "Queue depth high", "description": "1500 waiting"},
                  "startsAt": starts.isoformat(), "endsAt": ends.isoformat()}]
        req = urllib.request.Request(am + "/api/v2/alerts", data=json.dumps(alert).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200

    # When Alertmanager gets a firing alert
    post_alert(now + dt.timedelta(hours=1))
    # Then its webhook opens one incident, and the exporter's gauge shows it
    async def status():
        return await pool.fetchval("SELECT string_agg(status, ',') FROM incidents")

    assert await until(lambda: _eq(status(), "open"), 20, "the incident to open")
    metrics_url = stack.url("exporter") + "/metrics"
    wait_until(lambda: f'{m.INCIDENTS_OPEN}{{severity="critical"}} 1.0' in http_get(metrics_url)[1].decode(),
               10, what="incidents_open to show it")

    # When the alert resolves (ended 30 s ago: 60 s after it started)
    post_alert(now - dt.timedelta(seconds=30))
    # Then the incident closes, at the end time Alertmanager reports, and MTTR = 60 s
    assert await until(lambda: _eq(status(), "resolved"), 20, "the incident to resolve")
    row = await pool.fetchrow("SELECT count(*) OVER () AS n, started_at, resolved_at FROM incidents")
    assert row["n"] == 1
    assert row["resolved_at"] - row["started_at"] == dt.timedelta(seconds=60)
    wait_until(lambda: f"{m.INCIDENT_MTTR} 60.0" in http_get(metrics_url)[1].decode(), 10,
               what="MTTR on /metrics")
    assert f'{m.INCIDENTS_OPEN}{{severity="critical"}} 0.0' in http_get(metrics_url)[1].decode()


async def until(predicate, timeout: float, what: str):
    """Poll an async predicate without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


async def _eq(coro, expected) -> bool:
    return (await coro) == expected


async def test_lead_and_import_kpis_follow_a_real_import(stack, pool, make_key, exporter_settings):
    """The importer's own statements (staging, merge, ON CONFLICT) keep the trigger-kept lead
    counts exact: the KPIs equal ground truth after a real upload through the real worker."""
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client import CollectorRegistry

    from exporter import keys as ek
    from exporter.app import create_app

    stack.start_service("importer")
    stack.start_worker("importer")
    key = await make_key("import")
    # Given leads already there: one of them is in the file again, one is unsubscribed
    await pool.execute("INSERT INTO leads (email, status) VALUES ('lead3@example.com', 'active'),"
                       " ('gone@example.com', 'unsubscribed')")
    rows = ["email,first_name"] + [f"lead{i}@example.com,Name{i}" for i in range(1, 41)]
    rows += ["lead7@example.com,Dup", "not-an-email,Bad", "also bad@,Bad"]
    # When a CSV is uploaded and imported by the real importer worker
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("file", ("\n".join(rows) + "\n").encode(), filename="leads.csv", content_type="text/csv")
        async with http.post(stack.url("importer") + "/api/upload", data=form, headers=bearer(key)) as resp:
            assert resp.status == 202, await resp.text()
            import_id = (await resp.json())["id"]

        async def finished():
            async with http.get(f"{stack.url('importer')}/api/imports/{import_id}", headers=bearer(key)) as r:
                body = await r.json()
            return body if body["status"] in ("completed", "failed") else None

        result = await until(finished, 60, "the import to finish")
    assert result["status"] == "completed", result
    # Then the exporter's KPIs equal ground truth
    registry = CollectorRegistry()
    app = create_app(exporter_settings, registry=registry)

    async with TestClient(TestServer(app)) as client:
        await app[ek.REFRESHER].refresh_once()
        truth = {r["status"]: r["n"] for r in await pool.fetch("SELECT status, count(*) AS n FROM leads GROUP BY status")}
        assert truth["active"] == 40 and truth["unsubscribed"] == 1
        for status in ("active", "unsubscribed", "bounced", "complained"):
            assert registry.get_sample_value(m.LEADS, {"status": status}) == truth.get(status, 0)
        imp = await pool.fetchrow("SELECT processed_rows, invalid FROM imports WHERE id = $1", import_id)
        assert imp["invalid"] == 2
        assert registry.get_sample_value(m.IMPORT_SUCCESS_RATIO) == 1.0
        assert registry.get_sample_value(m.IMPORT_VALIDATION_ERROR_RATIO) == pytest.approx(
            imp["invalid"] / imp["processed_rows"])
        assert registry.get_sample_value(m.IMPORTS, {"status": "completed"}) == 1
        assert (await client.get("/metrics")).status == 200
