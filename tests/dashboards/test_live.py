"""Every dashboard query against a live Prometheus scraping the real stack.

Given the services, workers, SMTP sink, exporters and Alertmanager started on free ports
(tests/stack.py) and a Prometheus scraping them every second with the generated alert rules,
When a scripted workload goes through the real APIs (an import with invalid and duplicate rows,
a campaign delivered to the sink, opens and clicks, signed provider webhooks, an incident opened
and resolved through the Alertmanager webhook),
Then every PromQL target, variables substituted with the values Prometheus knows, is accepted
and returns data — except the few listed in EXPECTED_EMPTY, each with the reason it cannot —
and every metric a dashboard names is exposed by a scraped target (or a rule).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import json
import os
import re
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import pytest
import yaml

from dashboards.queries import check_prometheus, iter_queries, metric_names
from mailgenius import auth
from mailgenius.settings import load_settings
from tests.conftest import ROOT, TABLES
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

#: Queries that cannot return data after the scripted workload, and why. Keys: uid/panel/refId.
EXPECTED_EMPTY: dict[str, str] = {
    "alerts-incidents/Firing by severity/A":
        "only the Watchdog fires in a healthy stack, and the panel leaves it out",
    "alerts-incidents/Incident timeline (firing alerts)/A":
        "only the Watchdog fires in a healthy stack, and the timeline leaves it out",
    "alerts-incidents/annotation: Firing alerts/annotation":
        "only the Watchdog fires in a healthy stack, and the annotation leaves it out",
    "system-health/annotation: Firing alerts/annotation":
        "only the Watchdog fires in a healthy stack, and the annotation leaves it out",
    "import-progress/annotation: Firing alerts/annotation":
        "only the Watchdog fires in a healthy stack, and the annotation leaves it out",
    "email-metrics/annotation: Firing alerts/annotation":
        "only the Watchdog fires in a healthy stack, and the annotation leaves it out",
    "queue-health/annotation: Firing alerts/annotation":
        "only the Watchdog fires in a healthy stack, and the annotation leaves it out",
    # provider-aware KPIs: the workload sends over SMTP, which gives no delivery receipts, so the
    # figures only receipt providers (Resend) can know are unknown (empty), never 0 % or Inf
    "email-metrics/Delivery rate (range)/A": "SMTP sends only: no provider with delivery receipts sent",
    "email-metrics/Complaint rate (range)/A": "SMTP sends only: no provider with delivery receipts sent",
    "email-metrics/Delivery and bounce ratios/A": "SMTP sends only: no provider with delivery receipts sent",
    "email-metrics/Provider performance (range)/B": "SMTP sends only: no provider with delivery receipts sent",
    "slo/annotation: Firing alerts/annotation":
        "only the Watchdog fires in a healthy stack, and the annotation leaves it out",
}

#: On RabbitMQ (MAILGENIUS_TEST_BROKER_URL=amqp://...) the exporter cannot peek at a queue's head
#: without consuming it, so it exports no oldest-message age (exporter/collectors.py).
ON_RABBITMQ = (os.environ.get("MAILGENIUS_TEST_BROKER_URL") or "").startswith(("amqp://", "amqps://"))
NO_AGE_ON_RABBITMQ = "RabbitMQ cannot show a queue's head without consuming it: the exporter exports no age there"
if ON_RABBITMQ:
    EXPECTED_EMPTY.update({
        "import-progress/Oldest waiting import/A": NO_AGE_ON_RABBITMQ,
        "queue-health/Oldest waiting message age/A": NO_AGE_ON_RABBITMQ,
    })

#: Metrics a dashboard names that the workload cannot make appear, and why. Their panels still
#: show data: the queries fall back to zeros (helpers.zero_fill) until the first event.
NOT_YET_EXPOSED: dict[str, str] = {
    "dramatiq_message_rejects_total": "dramatiq creates it on the first dead-lettered message; the "
                                      "poison message needs ~30 s of back-off retries to get there",
    **({"mailgenius_queue_oldest_message_age_seconds": NO_AGE_ON_RABBITMQ} if ON_RABBITMQ else {}),
}

CSV_ROWS = 40


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float = 10.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


def _get_json(url: str, key: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: text/csv\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _empty_tables(database_url: str) -> None:
    """Start from empty tables: earlier suites of the session share this database (their
    incidents would shift MTTR, their leads and campaigns the counts)."""
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    asyncio.run(run())


def _create_key(database_url: str) -> str:
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            return (await auth.create_key(conn, ["read", "send", "import", "admin"], "dashboards-live"))[1]
        finally:
            await conn.close()

    return asyncio.run(run())


# -- the workload ----------------------------------------------------------------------------

def _wait(stack: Stack, predicate, timeout: float, what: str, log: str):
    """wait_until; on timeout fail with the worker's thread stacks (PYTHONFAULTHANDLER: SIGABRT
    makes every worker process print them) and the tail of its log."""
    try:
        return wait_until(predicate, timeout, 0.5, what)
    except TimeoutError as exc:
        proc = stack.procs.get(log)
        if proc is not None and proc.alive:
            proc.signal_group(signal.SIGABRT)
            time.sleep(2)
        raise AssertionError(f"{exc}\n--- {log} log ---\n{stack.log(log, 12000)}") from None


def run_import(stack: Stack, key: str, tag: str) -> dict:
    lines = ["email,first_name,last_name"]
    for i in range(CSV_ROWS):
        lines.append(f"lead{i}.{tag}@example.com,Lead,{i}")
    lines += [f"lead0.{tag}@example.com,Dup,0", "not-an-email,Bad,1", ",Missing,2"]
    body, ctype = _multipart({"tags": tag, "source": "dashboards-live"}, "leads.csv", ("\n".join(lines) + "\n").encode())
    status, data = _post(stack.url("importer") + "/api/upload", body,
                         {"Authorization": f"Bearer {key}", "Content-Type": ctype})
    assert status == 202, data
    url = f"{stack.url('importer')}/api/imports/{data['id']}"

    def finished():
        _, job = _get_json(url, key)
        return job if job.get("status") in ("completed", "failed", "cancelled") else None

    job = _wait(stack, finished, 90, "the import to finish", "importer-worker")
    assert job["status"] == "completed", job
    # an empty file is accepted, then its import fails (the failure-rate panels count it)
    body, ctype = _multipart({}, "empty.csv", b"")
    status, data = _post(stack.url("importer") + "/api/upload", body,
                         {"Authorization": f"Bearer {key}", "Content-Type": ctype})
    assert status == 202, data
    url = f"{stack.url('importer')}/api/imports/{data['id']}"
    assert _wait(stack, finished, 90, "the empty import to fail", "importer-worker")["status"] == "failed"
    # and a request with no file at all is refused: the upload API's 4xx panel shows it
    status, data = _post(stack.url("importer") + "/api/upload", b"{}",
                         {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert 400 <= status < 500, data
    return job


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a click redirects to the campaign's link: never follow it off this machine


_OPENER = urllib.request.build_opener(_NoRedirect)


def _hit(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _html_of(path: Path) -> tuple[str, str]:
    """(decoded HTML body, List-Unsubscribe URL) of one message the sink kept."""
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    part = msg.get_body(preferencelist=("html",))
    return part.get_content(), msg["List-Unsubscribe"].strip("<>")


def run_campaign(stack: Stack, key: str, tag: str) -> tuple[int, int]:
    """A campaign to the imported leads, delivered to the SMTP sink; returns (id, recipients)."""
    auth_json = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    link = "https://example.com/offer"
    body = {"name": f"dashboards {tag}", "subject": "Dashboards live test", "from_email": "news@example.com",
            "html": f'<p>Hello</p><p><a href="{link}">Offer</a></p>', "text": f"Hello {link}",
            "segment": {"tags": [tag]}}
    status, data = _post(stack.url("sender") + "/api/campaigns", json.dumps(body).encode(), auth_json)
    assert status == 201, data
    cid = data["id"]
    status, data = _post(f"{stack.url('sender')}/api/campaigns/{cid}/send", b"{}", auth_json)
    assert status in (200, 202), data

    def done():
        _, c = _get_json(f"{stack.url('sender')}/api/campaigns/{cid}", key)
        return c if c.get("status") in ("sent", "failed") else None

    campaign = _wait(stack, done, 90, "the campaign to finish", "sender-worker")
    assert campaign["status"] == "sent" and campaign["sent"] == campaign["recipients"] == CSV_ROWS, campaign
    wait_until(lambda: len(stack.sink_messages()) >= CSV_ROWS, 30, 0.5, "the sink to hold every message")
    return cid, campaign["recipients"]


def engage(stack: Stack, count: int = 5) -> None:
    """Opens, clicks and one one-click unsubscribe, through the links of the delivered emails."""
    for path in stack.sink_messages()[:count]:
        html, unsubscribe = _html_of(path)
        opens = re.findall(r'(https?://[^"\s]+/t/o/[^"\s]+)', html)
        clicks = re.findall(r'(https?://[^"\s]+/t/c/[^"\s]+)', html)
        assert opens and clicks, html
        assert _hit(opens[0]) == 200
        assert _hit(clicks[0]) == 302
    _, unsubscribe = _html_of(stack.sink_messages()[-1])
    assert _hit(unsubscribe, b"List-Unsubscribe=One-Click",
                {"Content-Type": "application/x-www-form-urlencoded"}) in (200, 204)


def provider_webhooks(stack: Stack, database_url: str, cid: int, secret: str) -> None:
    """Svix-signed Resend events for the campaign's messages: delivered, a bounce, a complaint."""
    from svix.webhooks import Webhook

    async def ids():
        conn = await asyncpg.connect(database_url)
        try:
            return [r["id"] for r in await conn.fetch(
                "SELECT id FROM messages WHERE campaign_id = $1 ORDER BY id", cid)]
        finally:
            await conn.close()

    message_ids = asyncio.run(ids())
    hook = Webhook(secret)
    kinds = ["email.bounced", "email.complained", "email.delivery_delayed"] + ["email.delivered"] * (len(message_ids) - 3)
    for mid, kind in zip(message_ids, kinds, strict=True):
        now = dt.datetime.now(dt.UTC)
        payload = {"type": kind, "created_at": now.isoformat().replace("+00:00", "Z"),
                   "data": {"email_id": f"re_{uuid.uuid4().hex}", "created_at": now.isoformat(),
                            "tags": {"mg_message_id": str(mid)}}}
        raw = json.dumps(payload)
        svix_id = f"msg_{uuid.uuid4().hex}"
        headers = {"svix-id": svix_id, "svix-timestamp": str(int(now.timestamp())),
                   "svix-signature": hook.sign(svix_id, now, raw), "Content-Type": "application/json"}
        status, data = _post(stack.url("sender") + "/webhooks/resend", raw.encode(), headers)
        assert status == 200 and data["message_id"] == mid, data


def poison_message(settings) -> None:
    """A malformed import message (a non-numeric id): the actor raises, dramatiq counts the error
    and retries it with back-off — what the Error Tracking rows are for."""
    from mailgenius.broker import build_broker
    from mailgenius.metrics import QUEUE_IMPORT
    from mailgenius.worker import enqueue

    broker = build_broker(settings)
    try:
        enqueue(broker, QUEUE_IMPORT, "import_leads", "not-an-import-id")
    finally:
        broker.close()


def record_incidents(stack: Stack) -> None:
    """Two incidents opened and resolved through the exporter's Alertmanager webhook (MTTR, MTBF)."""
    now = dt.datetime.now(dt.UTC)
    for i, name in enumerate(("DashboardsLiveA", "DashboardsLiveB")):
        start = (now - dt.timedelta(minutes=30 - 10 * i)).isoformat().replace("+00:00", "Z")
        end = (now - dt.timedelta(minutes=25 - 10 * i)).isoformat().replace("+00:00", "Z")
        alert = {"labels": {"alertname": name, "severity": "warning", "service": "importer"},
                 "annotations": {"summary": "live dashboards test"}, "startsAt": start,
                 "fingerprint": f"dashlive{i}"}
        for status, ends in (("firing", "0001-01-01T00:00:00Z"), ("resolved", end)):
            payload = {"version": "4", "status": status, "receiver": "exporter", "groupLabels": {},
                       "commonLabels": {}, "commonAnnotations": {}, "externalURL": "", "groupKey": name,
                       "alerts": [{**alert, "status": status, "endsAt": ends}]}
            code, data = _post(stack.url("exporter") + "/api/alerts/webhook", json.dumps(payload).encode(),
                               {"Content-Type": "application/json", "Authorization": f"Bearer {ALERT_WEBHOOK_TOKEN}"})
            assert code == 200, data


# -- the stack -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(database_url, redis_url, redis_prefix, tmp_path_factory):
    require_binaries(PROMETHEUS, ALERTMANAGER)
    tmp = tmp_path_factory.mktemp("dashboards-live")
    _empty_tables(database_url)
    settings = load_settings({}).replace(
        # a prefix of our own under the session's (removed with it): other suites' workers,
        # heartbeats and queues stay out of these panels, and ours out of theirs
        database_url=database_url, redis_url=redis_url, redis_prefix=f"{redis_prefix}-dash",
        # MAILGENIUS_TEST_BROKER_URL=amqp://... runs the stack on RabbitMQ (tests/conftest.py)
        broker_url=os.environ.get("MAILGENIUS_TEST_BROKER_URL") or redis_url,
        upload_dir=str(tmp / "uploads"), sink_dir=str(tmp / "sink"), data_dir=str(tmp / "var"),
    )
    secret = "whsec_" + base64.b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes[:8]).decode()
    settings = settings.replace(resend_webhook_secret=secret)
    stack = Stack(settings, tmp)
    fast = {"MAILGENIUS_EXPORTER_REFRESH_SECONDS": "1"}
    try:
        stack.start_sink()
        for name in ("sender", "importer", "exporter"):
            stack.start_service(name, **fast)
        stack.start_worker("importer", PYTHONFAULTHANDLER="1")
        stack.start_worker("sender", PYTHONFAULTHANDLER="1")
        stack.start_exporters()
        # the scheduler with a backup every 5 s (the system-health row "Scheduled maintenance")
        stack.start_scheduler(MAILGENIUS_SCHEDULE_BACKUP="@every 5s", MAILGENIUS_SCHEDULE_CLEANUP_UPLOADS="@every 5s",
                              MAILGENIUS_SCHEDULE_REPORT_DAILY="off", MAILGENIUS_SCHEDULE_REPORT_WEEKLY="off",
                              MAILGENIUS_SCHEDULE_DB_MAINTENANCE="off")
        am = tmp / "alertmanager.yml"
        am.write_text(yaml.safe_dump({
            "route": {"receiver": "exporter", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "exporter", "webhook_configs": [
                {"url": stack.url("exporter") + "/api/alerts/webhook", "send_resolved": True,
                 "http_config": {"authorization": {"credentials": ALERT_WEBHOOK_TOKEN}}}]}],
        }))
        stack.start_alertmanager(am)
        jobs = {**stack.scrape_jobs(), "prometheus": stack.target("prometheus")}
        rules = sorted(str(p) for p in (ROOT / "prometheus" / "rules").glob("*.yml"))
        stack.start_prometheus(stack.prometheus_config(jobs=jobs, rule_files=rules))
        stack.wait_targets_up(60)

        key = _create_key(database_url)
        tag = uuid.uuid4().hex[:8]
        poison_message(settings)
        run_import(stack, key, tag)
        cid, _ = run_campaign(stack, key, tag)
        engage(stack)
        provider_webhooks(stack, database_url, cid, secret)
        record_incidents(stack)
        # some read traffic on every API, so request-rate and latency panels have samples
        for name in ("sender", "importer", "exporter"):
            for _ in range(5):
                http_get(stack.url(name) + "/api/health", timeout=5)
        # two exporter refreshes and enough 1 s scrapes for rate() over the workload
        time.sleep(6)
        yield stack
    finally:
        stack.stop_all()


def test_every_promql_target_is_accepted_and_returns_data(live, dashboards):
    results = check_prometheus(live.url("prometheus"), dashboards)
    assert len(results) > 100
    rejected = [f"{r.query.key}: {r.error}\n    {r.expr}" for r in results if not r.ok]
    empty = sorted(r.query.key for r in results if r.ok and r.series == 0)
    unexpected = [f"{r.query.key}\n    {r.expr}" for r in results
                  if r.ok and r.series == 0 and r.query.key not in EXPECTED_EMPTY]
    assert not rejected and not unexpected, (
        "Prometheus rejected:\n" + "\n".join(rejected) + "\n\nno data for:\n" + "\n".join(unexpected))
    # an exception that has started returning data is stale: drop it from the list
    now_full = [k for k in EXPECTED_EMPTY if k not in empty]
    assert not now_full, f"listed as empty but returning data: {now_full}"


def test_every_metric_a_dashboard_names_is_exposed_by_a_scraped_target(live, dashboards):
    status, body = http_get(live.url("prometheus") + "/api/v1/label/__name__/values", timeout=10)
    assert status == 200
    exposed = set(json.loads(body)["data"])
    status, body = http_get(live.url("prometheus") + "/api/v1/rules", timeout=10)
    produced = {r.get("name") for g in json.loads(body)["data"]["groups"] for r in g["rules"]}
    missing = {}
    for dash in dashboards.values():
        for q in iter_queries(dash):
            if q.datasource == "prometheus":
                for name in metric_names(q.expr) - exposed - produced:
                    missing.setdefault(name, q.key)
    # ALERTS exists as soon as one alert (the Watchdog) is pending or firing
    unexpected = {name: key for name, key in missing.items() if name not in NOT_YET_EXPOSED}
    assert not unexpected, "named by a dashboard but exposed by no target: " + json.dumps(unexpected, indent=1)


def test_the_alert_rules_panel_has_rules_linked_to_dashboards(live, dashboards):
    # "Alert rules" reads Prometheus' rules API through Grafana: every rule, linked to a dashboard
    status, body = http_get(live.url("prometheus") + "/api/v1/rules?type=alert", timeout=10)
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
    assert status == 200 and len(rules) >= 10
    for rule in rules:
        url = rule["annotations"].get("dashboard_url", "")
        m = re.search(r"(?:/d/|[?&]dashboard=)([\w-]+)", url)
        assert m and m.group(1) in dashboards, rule["name"]


def test_cli_check_reports_every_query_with_data(live):
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "mailgenius")
    proc = subprocess.run([cli, "dashboards", "check", "--root", str(ROOT), "--prometheus-url", live.url("prometheus")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.splitlines()[-1]
    total, with_data, empty = map(int, re.match(r"(\d+) queries: (\d+) with data, (\d+) empty, 0 rejected", summary).groups())
    assert empty == len(EXPECTED_EMPTY) and with_data == total - empty, proc.stdout


def _values(live, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in live.prom_query(expr)}


def test_the_workload_shows_in_the_email_panels(live):
    # the data is the workload's, not any series that happens to exist
    sent = _values(live, "sum by (provider) (mailgenius_emails_sent_total)", "provider")
    assert sent.get("smtp") == CSV_ROWS
    events = _values(live, "sum by (event) (mailgenius_email_events_total)", "event")
    assert events["delivered"] == CSV_ROWS - 3 and events["bounced"] == 1 and events["complained"] == 1
    assert events["opened"] >= 5 and events["clicked"] >= 5
    assert _values(live, 'sum(mailgenius_leads{status="unsubscribed"})', "")[""] >= 1
    assert _values(live, 'sum by (outcome) (mailgenius_campaigns_finished_total)', "outcome")["sent"] == 1
    by_status = _values(live, "sum by (status) (mailgenius_campaign_messages)", "status")
    assert by_status.get("sent", 0) + by_status.get("delivered", 0) >= CSV_ROWS - 3, by_status


def test_the_poison_message_shows_in_the_error_tracking_panels(live):
    errors = _values(live, "sum by (actor_name) (dramatiq_message_errors_total)", "actor_name")
    retries = _values(live, "sum by (actor_name) (dramatiq_message_retries_total)", "actor_name")
    assert errors.get("import_leads", 0) >= 1 and retries.get("import_leads", 0) >= 1, (errors, retries)


def test_the_workload_shows_in_the_import_panels(live):
    # the data is the workload's, not any series that happens to exist
    rows = {r["metric"]["outcome"]: float(r["value"][1])
            for r in live.prom_query("sum by (outcome) (mailgenius_import_rows_total)")}
    assert rows.get("inserted", 0) >= CSV_ROWS
    assert rows.get("invalid", 0) >= 2 and rows.get("duplicate", 0) >= 1
    reasons = {r["metric"]["reason"] for r in live.prom_query(
        "sum by (reason) (mailgenius_import_validation_errors_total) > 0")}
    assert {"invalid_syntax", "missing_email"} <= reasons, reasons
    assert float(live.prom_query("max(mailgenius_incident_mttr_seconds)")[0]["value"][1]) == pytest.approx(300, abs=5)




# -- one truth: the same figure from every reader ----------------------------------------------

def _page_stats(live, key: str) -> dict:
    """The monitoring page's data endpoint (its stats), through a real login."""
    import http.cookiejar
    import urllib.parse

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    base = live.url("exporter") + "/dashboard/monitoring"
    opener.open(urllib.request.Request(base + "/login", data=urllib.parse.urlencode({"key": key}).encode(),
                                       method="POST"), timeout=10)
    with opener.open(base + "/api/series?range=1h", timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["ok"], body
    return body["stats"]


def _report_figures(live) -> dict[str, str]:
    from console import report
    from mailgenius.prom import Prometheus

    async def run():
        async with Prometheus(live.url("prometheus")) as prom:
            return await report.collect_report(prom, "daily")

    ctx = asyncio.run(run())
    figures = {k: v for sec in ctx["s"].values() if isinstance(sec, dict) for k, v in sec.get("figures", [])}
    waiting = {row[0]: row[2] for row in ctx["s"]["queues"]["table"]["rows"]}
    return {**figures, **{f"waiting {q}": v for q, v in waiting.items()}}


def _pct_text(text: str) -> float | None:
    return None if text in ("n/a",) else float(text.replace(" %", ""))


def test_every_reader_shows_the_same_figures(live):
    """After the scripted workload, Prometheus (the recorded series), the summary API, the
    monitoring page's data endpoint and the report agree, to rounding, on the delivery, bounce,
    open and click rates, the API p95, queue depth and disk use. (The workload sends over SMTP
    and posts Resend receipts: the delivery rate is unknown everywhere, never a ratio of Resend
    events over SMTP sends.) The recorded series are re-evaluated every second while the readers
    answer one after the other, so each reader's figure is compared with Prometheus' just before
    and just after it read."""
    from mailgenius import contract
    from mailgenius import metrics as m

    c = contract.get()
    key = _create_key(live.settings.database_url)

    exprs = {
        "delivery": c.series("email_delivery_ratio_all"),
        "bounce": c.series("email_bounce_ratio_all"),
        "open": c.series("email_open_ratio_all"),
        "click": c.series("email_click_ratio_all"),
        "p95": c.series("api_latency_p95_all"),
        "disk": f"max({c.series('disk_usage')})",
        "email_waiting": f'max({c.series("queue_waiting", f"queue={json.dumps(m.QUEUE_EMAIL)}")})',
    }

    def span(expr: str, start: float, end: float) -> tuple[float, float] | None:
        """(lowest, highest) value of a series between two instants (every 0.25 s)."""
        url = live.url("prometheus") + "/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "0.25"})
        res = json.loads(http_get(url, timeout=10)[1])["data"]["result"]
        values = [float(v) for r in res for _t, v in r["values"]]
        return (min(values), max(values)) if values else None

    def read(fn):
        # a reader may evaluate at the last whole second (the page does), and a rule evaluation
        # is stamped with its scheduled time but becomes visible only once its whole group has
        # run (seconds later on a loaded machine: a reader saw a sample that the range query,
        # asked afterwards, finds superseded by a late one stamped earlier): from 5 s before it
        start = time.time() - 5.0
        value = fn()
        end = time.time()
        return {k: span(e, start, end) for k, e in exprs.items()}, value

    def agrees(spans: dict, k: str, got: float | None, scale: float, tol: float) -> None:
        assert spans[k] is not None, k
        lo, hi = spans[k]
        assert got is not None and lo * scale - tol <= got <= hi * scale + tol, (k, got, lo * scale, hi * scale)

    ts, summary = read(lambda: _get_json(live.url("exporter") + "/api/monitoring/metrics", key)[1])
    tp, page = read(lambda: _page_stats(live, key))
    tr, report = read(lambda: _report_figures(live))
    print("truth", ts, "\nsummary", summary["email_stats"], summary["api_latency"], summary["resources"],
          "\npage", page, "\nreport", report)

    # delivery: SMTP sends, no provider with receipts sent anything: null everywhere, labelled
    for t in (ts, tp, tr):
        assert t["delivery"] is None, t
    assert summary["email_stats"]["delivery_rate"] is None and "delivery_rate" in summary["email_stats"]["not_reported"]
    assert summary["provider_performance"]["smtp"]["delivery_rate"] is None
    assert "delivery_rate" in summary["provider_performance"]["smtp"]["not_reported"]
    assert page["delivery_rate"]["value"] is None and page["delivery_rate"]["not_reported"]
    assert report["delivery rate, last hour"].startswith("not reported")
    # bounce, open, click: the same ratio (summary: percent, 3 decimals; report: 2 decimals)
    for k in ("bounce", "open", "click"):
        assert ts[k] is not None and ts[k][0] > 0, (k, ts)
        agrees(ts, k, summary["email_stats"][f"{k}_rate"], 100, 0.0005)
        agrees(tp, k, page[f"{k}_rate"]["value"], 1, 1e-12)
        agrees(tr, k, _pct_text(report[f"{k} rate, last hour"]), 100, 0.005)
    # API p95 (the readers' own requests count in it: compared within the bracket too)
    agrees(ts, "p95", summary["api_latency"]["p95"], 1000, 0.0005)
    agrees(tp, "p95", page["api_p95"]["value"], 1, 1e-12)
    agrees(tr, "p95", float(report["latency p95 now (5 min)"].replace(" ms", "")), 1000, 0.05)
    # queue depth: the broker (summary) and the exporter's gauge (Prometheus, page, report)
    assert summary["queue_health"]["email_queue"] is not None
    assert summary["queue_health"]["email_queue"]["waiting"] == summary["queue_health"][m.QUEUE_EMAIL]["waiting"]
    agrees(ts, "email_waiting", summary["queue_health"]["email_queue"]["waiting"], 1, 0)
    agrees(tp, "email_waiting", page["email_queue_waiting"]["value"], 1, 0)
    agrees(tr, "email_waiting", float(report[f"waiting {m.QUEUE_EMAIL}"]), 1, 0)
    # disk: the fullest filesystem DiskSpaceLow watches
    agrees(ts, "disk", summary["resources"]["disk_usage"], 100, 0.0005)
    agrees(tp, "disk", page["disk_usage"]["value"], 1, 1e-12)
    agrees(tr, "disk", float(report["fullest disk"].replace(" %", "")), 100, 0.05)
