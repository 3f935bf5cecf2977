"""End to end with the real binaries: the generated rules and configs (a test variant: 1 s
scrapes and evaluations, `for:` shortened to 2 s, 1 s group_wait) in a real Prometheus scraping
the real services and exporters, a real Alertmanager delivering to the local SMTP sink, a local
Slack-webhook receiver, a local PagerDuty-events receiver and the exporter's incident webhook.

Measured delivery bound (condition true -> email and Slack received), on this 2-core machine at
load ~7: QueueDepthHigh 4.1 s (exporter refresh 0.5 s + scrape 1 s + evaluation 1 s + for 2 s +
group_wait 1 s), ServiceDown 3.8 s (PagerDuty too), resolution on every channel and the incident
closed 1.2 s after the service is back. The test allows DELIVERY_BOUND seconds and prints the
measured figures (pytest -s).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest
import redis

from alerting import generate
from mailgenius import auth, contract
from mailgenius.broker import build_broker
from mailgenius.metrics import QUEUE_EMAIL
from mailgenius.worker import enqueue
from tests.alerting.receivers import Recorder
from tests.conftest import bearer
from tests.stack import ALERTMANAGER, PROMETHEUS, Stack, http_get, require_binaries, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

#: seconds allowed from "the condition holds" to "email and Slack have it" (measured: ~4 s)
DELIVERY_BOUND = 25.0
#: messages enqueued with no worker: more than the documented 1000
QUEUED = 1200
#: the incident webhook's bearer token (exporter and Alertmanager secret file)
WEBHOOK_TOKEN = "e2e-webhook-token-0123456789abcdef"
#: the PagerDuty routing key the test writes into the secret file
ROUTING_KEY = "e2e0routing0key0000000000000000a"


def get_json(url: str, key: str):
    req = urllib.request.Request(url, headers=bearer(key))
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def create_key(database_url: str) -> str:
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("TRUNCATE incidents RESTART IDENTITY")
            _id, key = await auth.create_key(conn, ["read"], "alerting-e2e")
            return key
        finally:
            await conn.close()

    return asyncio.run(run())


def sink_mails(stack: Stack) -> list[email.message.EmailMessage]:
    out = []
    for path in stack.sink_messages():
        out.append(email.message_from_bytes(Path(path).read_bytes(), policy=email.policy.default))
    return out


def mails_about(stack: Stack, alertname: str, status: str) -> list[email.message.EmailMessage]:
    return [m for m in sink_mails(stack) if alertname in m["Subject"] and m["Subject"].startswith(f"[{status}")]


def slack_about(rec: Recorder, alertname: str, status: str) -> list[dict]:
    return [b for b in rec.bodies()
            if any(alertname in a.get("title", "") and a["title"].startswith(f"[{status}") for a in b.get("attachments", []))]


def pd_events(rec: Recorder) -> list[dict]:
    return rec.bodies()


@pytest.fixture
def e2e(settings, redis_prefix, tmp_path):
    require_binaries(PROMETHEUS, ALERTMANAGER)
    # a namespace of our own: the 1200 waiting messages must not reach other suites' workers
    settings = settings.replace(redis_prefix=f"{redis_prefix}-alerting")
    key = create_key(settings.database_url)
    stack = Stack(settings, tmp_path)
    with Recorder() as slack, Recorder(status=202) as pagerduty, Recorder() as deadman:
        try:
            yield stack, slack, pagerduty, deadman, key
        finally:
            stack.stop_all()
            client = redis.Redis.from_url(settings.redis_url)
            for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000):
                client.delete(k)
            client.close()


def test_alerts_reach_email_slack_pagerduty_and_incidents_and_resolve(e2e):
    stack, slack, pagerduty, deadman, key = e2e

    # Given the real services, exporters and monitoring stack, with the generated configs
    stack.start_sink()
    stack.start_service("exporter", MAILGENIUS_EXPORTER_REFRESH_SECONDS="0.5", MAILGENIUS_ALERT_WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    stack.start_service("sender")
    stack.start_exporters()
    secrets = stack.tmp / "secrets"
    secrets.mkdir()
    (secrets / "slack_api_url").write_text(f"{slack.url}/services/T000/B000/e2e")
    (secrets / "pagerduty_routing_key").write_text(ROUTING_KEY)
    (secrets / "alert_webhook_token").write_text(WEBHOOK_TOKEN)
    jobs = {job: [target] for job, target in stack.scrape_jobs().items()}
    jobs["alertmanager"] = [stack.target("alertmanager")]
    jobs["prometheus"] = [stack.target("prometheus")]
    variant = generate.local_variant(
        ports={"exporter": stack.ports["exporter"], "alertmanager": stack.ports["alertmanager"],
               "smtp": stack.ports["sink"]},
        targets=jobs, scrape_interval="1s", evaluation_interval="1s", group_wait="1s",
        group_interval="1s", for_override="2s", secrets_dir=str(secrets),
        pagerduty_url=f"{pagerduty.url}/v2/enqueue", watchdog_url=f"{deadman.url}/ping",
        incident_webhook_token=True,  # the exporter refuses the webhook without it
    )
    paths = generate.render_to(stack.tmp / "configs", variant)
    stack.start_alertmanager(paths["alertmanager"])
    stack.start_prometheus(paths["prometheus"], extra_args=("--rules.alert.resend-delay=1s",))
    stack.wait_targets_up(timeout=30)

    # Then the series the rules read exist on the real exporters, and the recording rules
    # produce values from them (a renamed exporter metric would silently disable an alert)
    for name in ("pg_stat_activity_count", "pg_stat_database_blks_hit", "pg_stat_database_blks_read",
                 "redis_memory_used_bytes", "redis_memory_max_bytes", "node_cpu_seconds_total",
                 "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes", "node_filesystem_avail_bytes",
                 "node_filesystem_size_bytes", "mailgenius_queue_messages", "mailgenius_workers",
                 "mailgenius_http_requests_total", "mailgenius_http_request_duration_seconds_bucket"):
        wait_until(lambda n=name: stack.prom_query(f"count({n})"), 15, what=f"series {name}")
    c = contract.get()
    for record in (c.series(k) for k in ("cpu_utilisation", "memory_utilisation", "disk_usage", "redis_memory",
                                         "pg_connections", "pg_cache_hit_ratio", "api_latency_p95",
                                         "api_latency_p95_all", "queue_waiting")):
        wait_until(lambda r=record: stack.prom_query(r), 15, what=f"recording rule {record}")

    # Then the Watchdog reaches the dead man's switch (and nothing else)
    wait_until(lambda: any(a["labels"]["alertname"] == "Watchdog" for b in deadman.bodies() for a in b["alerts"]),
               DELIVERY_BOUND, what="Watchdog at its receiver")
    assert not slack_about(slack, "Watchdog", "FIRING") and not mails_about(stack, "Watchdog", "FIRING")

    # When more than 1000 messages wait on email-sending and no worker runs
    broker = build_broker(stack.settings)
    for i in range(QUEUED):
        enqueue(broker, QUEUE_EMAIL, "send_message", i)
    broker.close()
    t_queue = time.monotonic()

    # Then email and Slack receive QueueDepthHigh, with its rendered annotations
    mail = wait_until(lambda: mails_about(stack, "QueueDepthHigh", "FIRING"), DELIVERY_BOUND,
                      what="QueueDepthHigh email")[0]
    t_mail = time.monotonic()
    note = wait_until(lambda: slack_about(slack, "QueueDepthHigh", "FIRING"), DELIVERY_BOUND,
                      what="QueueDepthHigh on Slack")[0]
    t_slack = time.monotonic()
    assert mail["To"] == "ops@mailgenius.com, dev@mailgenius.com"
    html = mail.get_body(("html",)).get_content()
    assert f"{QUEUED} messages wait in queue email-sending (threshold 1000)." in html
    # the dashboard link: Grafana's /d/<uid>, or (no MAILGENIUS_GRAFANA_URL) the monitoring page
    assert "/docs/runbooks/QueueDepthHigh.md" in html
    assert re.search(r"(/d/|/dashboard/monitoring\?dashboard=)queue-health", html), html
    assert note["channel"] == "#alerts"
    attachment = note["attachments"][0]
    assert attachment["color"] == "danger"
    assert f"{QUEUED} messages wait in queue email-sending" in attachment["text"]
    print(f"\nQueueDepthHigh: email after {t_mail - t_queue:.1f} s, Slack after {t_slack - t_queue:.1f} s")

    # ... and WorkersDown (critical, messages waiting with no worker) pages; QueueDepthHigh does not
    wait_until(lambda: any("WorkersDown" in e["payload"]["summary"] for e in pd_events(pagerduty)),
               DELIVERY_BOUND, what="WorkersDown on PagerDuty")

    # When a service stops
    stack.stop("sender")
    t_down = time.monotonic()

    # Then ServiceDown reaches email, Slack and PagerDuty
    wait_until(lambda: mails_about(stack, "ServiceDown", "FIRING"), DELIVERY_BOUND, what="ServiceDown email")
    t_mail = time.monotonic()
    note = wait_until(lambda: slack_about(slack, "ServiceDown", "FIRING"), DELIVERY_BOUND, what="ServiceDown on Slack")[0]
    t_slack = time.monotonic()
    assert "sender (" in note["attachments"][0]["text"]
    page = wait_until(lambda: [e for e in pd_events(pagerduty) if "ServiceDown" in e["payload"]["summary"]],
                      DELIVERY_BOUND, what="ServiceDown on PagerDuty")[0]
    t_page = time.monotonic()
    assert page["routing_key"] == ROUTING_KEY  # read from the secret file
    assert page["event_action"] == "trigger" and page["payload"]["severity"] == "critical"
    assert page["payload"]["custom_details"]["runbook_url"].endswith("/docs/runbooks/ServiceDown.md")
    print(f"ServiceDown: email after {t_mail - t_down:.1f} s, Slack after {t_slack - t_down:.1f} s, "
          f"PagerDuty after {t_page - t_down:.1f} s")

    # and the incidents are recorded by the exporter (the Watchdog never is)
    def incidents():
        body = get_json(stack.url("exporter") + "/api/incidents?limit=100", key)
        return {(i["alertname"], i["status"]) for i in body["incidents"]}

    wait_until(lambda: {("QueueDepthHigh", "open"), ("ServiceDown", "open"), ("WorkersDown", "open")} <= incidents(),
               DELIVERY_BOUND, what="incidents open")
    assert not any(name == "Watchdog" for name, _ in incidents())

    # When the service comes back
    stack.start_service("sender")
    t_up = time.monotonic()

    # Then the resolution is notified on every channel, and the incident closes
    wait_until(lambda: mails_about(stack, "ServiceDown", "RESOLVED"), DELIVERY_BOUND, what="ServiceDown resolved email")
    wait_until(lambda: slack_about(slack, "ServiceDown", "RESOLVED"), DELIVERY_BOUND, what="ServiceDown resolved on Slack")
    wait_until(lambda: [e for e in pd_events(pagerduty) if e["event_action"] == "resolve"
                        and e["dedup_key"] == page["dedup_key"]], DELIVERY_BOUND, what="ServiceDown resolved on PagerDuty")
    wait_until(lambda: ("ServiceDown", "resolved") in incidents(), DELIVERY_BOUND, what="ServiceDown incident resolved")
    print(f"ServiceDown resolution: all channels and the incident within {time.monotonic() - t_up:.1f} s")

    # PagerDuty got only the critical alerts routed to it: never QueueDepthHigh (email + Slack only)
    paged = {name for e in pd_events(pagerduty) for name in ("QueueDepthHigh", "ServiceDown", "WorkersDown", "Watchdog")
             if name in e["payload"]["summary"]}
    assert paged == {"ServiceDown", "WorkersDown"}, paged
    assert all(e["payload"]["severity"] == "critical" for e in pd_events(pagerduty))
    # no alert fired that the situation does not explain (a stray one would mean a wrong rule);
    # the host alerts may be true of this shared 2-core machine (with `for:` shortened to 2 s)
    _, body = http_get(stack.url("prometheus") + "/api/v1/alerts")
    firing = {a["labels"]["alertname"] for a in json.loads(body)["data"]["alerts"] if a["state"] == "firing"}
    host = {"HighCPUUsage", "HighMemoryUsage", "DiskSpaceLow"}
    assert firing - host <= {"Watchdog", "QueueDepthHigh", "WorkersDown", "ServiceDown"}, firing
