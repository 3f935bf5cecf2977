"""An Alertmanager receiver that is down when an alert fires still gets the notification once it
is back: the real Alertmanager binary with the generated configuration (alerting/generate.py,
1 s group timings), a critical alert posted to it, and local Slack and PagerDuty stand-ins that
refuse connections at first and come up a few seconds later."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port
from tests.reliability.conftest import _stack_class

pytestmark = pytest.mark.slow

generate = pytest.importorskip("alerting.generate")

#: seconds the receivers stay down after the alert is posted
DOWN_FOR = 6.0
#: seconds allowed from "receiver up" to "notification received"
DELIVERY_BOUND = 20.0


class Receiver:
    """A JSON webhook receiver on a fixed port (so it can be 'down' before it exists)."""

    def __init__(self, port: int):
        self.port = port
        self.bodies: list[dict] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rec.bodies.append(json.loads(raw or b"{}"))
                out = b'{"status": "success"}'
                self.send_response(202 if "enqueue" in self.path else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def am_metric(stack, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.url("alertmanager") + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_notification_delivered_after_receiver_comes_back(settings, tmp_path):
    stack = _stack_class()(settings, tmp_path)
    slack_port, pd_port, dead = free_port(), free_port(), free_port()
    receivers: list[Receiver] = []
    try:
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "slack_api_url").write_text(f"http://127.0.0.1:{slack_port}/services/T000/B000/rel")
        (secrets / "pagerduty_routing_key").write_text("rel0routing0key00000000000000000")
        variant = generate.local_variant(
            ports={"alertmanager": stack.ports["alertmanager"], "smtp": dead, "exporter": dead},
            group_wait="1s", group_interval="1s", secrets_dir=str(secrets),
            pagerduty_url=f"http://127.0.0.1:{pd_port}/v2/enqueue")
        paths = generate.render_to(tmp_path / "configs", variant)
        stack.start_alertmanager(paths["alertmanager"])
        # Given a critical alert (email, Slack and PagerDuty) while Slack and PagerDuty are down
        now = dt.datetime.now(dt.UTC)
        alert = [{"labels": {"alertname": "DatabaseConnectionsHigh", "severity": "critical",
                             "service": "postgres", "instance": "reliability"},
                  "annotations": {"summary": "Postgres connections above 80",
                                  "description": "reliability suite: receiver down then up"},
                  "startsAt": now.isoformat(), "endsAt": (now + dt.timedelta(minutes=10)).isoformat()}]
        req = urllib.request.Request(stack.url("alertmanager") + "/api/v2/alerts", data=json.dumps(alert).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5).close()
        # When Alertmanager has tried (and failed) to notify them
        end = time.monotonic() + 20
        while am_metric(stack, "alertmanager_notifications_failed_total", integration="slack") < 1:
            assert time.monotonic() < end, "Alertmanager never tried Slack\n" + stack.log("alertmanager")
            time.sleep(0.3)
        time.sleep(DOWN_FOR)
        # And the receivers come back
        up_at = time.monotonic()
        slack, pd = Receiver(slack_port), Receiver(pd_port)
        receivers += [slack, pd]
        # Then the notification reaches both, within the bound, about the alert
        while not (slack.bodies and pd.bodies):
            assert time.monotonic() - up_at < DELIVERY_BOUND, (
                f"not delivered within {DELIVERY_BOUND}s: slack={len(slack.bodies)} pagerduty={len(pd.bodies)}\n"
                + stack.log("alertmanager"))
            time.sleep(0.2)
        assert "DatabaseConnectionsHigh" in json.dumps(slack.bodies)
        assert "DatabaseConnectionsHigh" in json.dumps(pd.bodies)
        assert am_metric(stack, "alertmanager_notifications_total", integration="slack") >= 2
        print(f"delivered {time.monotonic() - up_at:.1f}s after the receivers came back")
    finally:
        stack.stop_all()
        for r in receivers:
            r.close()
