"""The generated Alertmanager config in a real Alertmanager: warnings are inhibited while the
same alert is critical, and only then."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request

import pytest

from alerting import generate
from tests.alerting.receivers import Recorder
from tests.stack import ALERTMANAGER, Stack, require_binaries, wait_until


def post_alerts(stack: Stack, alerts: list[dict]) -> None:
    req = urllib.request.Request(stack.url("alertmanager") + "/api/v2/alerts", data=json.dumps(alerts).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def disk_alert(severity: str, mountpoint: str) -> dict:
    now = dt.datetime.now(dt.UTC)
    return {
        "labels": {"alertname": "DiskSpaceLow", "severity": severity, "service": "node",
                   "instance": "db-host:9100", "mountpoint": mountpoint},
        "annotations": {"summary": f"Disk usage above {'90' if severity == 'critical' else '80'} %."},
        "startsAt": now.isoformat(),
        "endsAt": (now + dt.timedelta(minutes=5)).isoformat(),
    }


@pytest.fixture
def stack(settings, tmp_path):
    require_binaries(ALERTMANAGER)
    s = Stack(settings, tmp_path)
    yield s
    s.stop_all()


def test_a_warning_is_inhibited_while_the_same_alert_is_critical(stack):
    with Recorder() as sink:
        # Given Alertmanager with the generated routing (receivers pointed at a local recorder,
        # group_wait long enough that nothing is sent during the test)
        variant = generate.local_variant(ports={"exporter": sink.port, "smtp": sink.port,
                                                "alertmanager": stack.ports["alertmanager"]},
                                         group_wait="1m", secrets_dir=str(stack.tmp))
        paths = generate.render_to(stack.tmp / "configs", variant)
        stack.start_alertmanager(paths["alertmanager"])

        # When DiskSpaceLow is critical on / and warning on / and on /data
        post_alerts(stack, [disk_alert("critical", "/"), disk_alert("warning", "/"), disk_alert("warning", "/data")])

        # Then only the warning on the same filesystem is muted, by the critical one
        # (the inhibitor learns of the critical alert through its own subscription, a moment after
        # the API holds all three: a read in between shows the warning still active, as it did
        # once in a CI run; so wait for the muting, and fail if it never comes)
        def states():
            alerts = stack.alerts()
            if len(alerts) != 3:
                return None
            status = {(a["labels"]["severity"], a["labels"]["mountpoint"]): a["status"] for a in alerts}
            return status if status[("warning", "/")]["state"] != "active" else None

        status = wait_until(states, 10, what="three alerts in Alertmanager, the warning on / muted")
        assert status[("critical", "/")]["state"] == "active"
        assert status[("warning", "/data")]["state"] == "active"
        assert status[("warning", "/")]["state"] == "suppressed"
        assert status[("warning", "/")]["inhibitedBy"], status


def test_a_still_firing_alert_is_renotified_after_its_cooldown_not_the_group_interval(stack):
    # Given the generated routing from a copy of rules.yml where the Watchdog's cooldown is 3 s
    # and the global group_interval 1 m (the real ones: 1 min and 5 min; scaled down to stay short)
    source = generate.SOURCE.read_text()
    for old, new in (("    cooldown: 1m\n    for: 0s", "    cooldown: 3s\n    for: 0s"),
                     ("group_interval: 5m ", "group_interval: 1m ")):
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    rules = stack.tmp / "rules.yml"
    rules.write_text(source)
    # the webhook receivers send the exporter's bearer token from this file (issue 18)
    (stack.tmp / "alert_webhook_token").write_text("test-renotify-webhook-token-0123456789")
    with Recorder() as sink:
        variant = generate.local_variant(ports={"exporter": sink.port, "smtp": sink.port,
                                                "alertmanager": stack.ports["alertmanager"]},
                                         group_wait="1s", secrets_dir=str(stack.tmp))
        paths = generate.render_to(stack.tmp / "configs", variant, source=rules)
        stack.start_alertmanager(paths["alertmanager"])

        # When the Watchdog keeps firing (re-sent like Prometheus does)
        def watchdog_notifications():
            now = dt.datetime.now(dt.UTC)
            post_alerts(stack, [{"labels": {"alertname": "Watchdog", "severity": "none"},
                                 "annotations": {"summary": "heartbeat"}, "startsAt": now.isoformat(),
                                 "endsAt": (now + dt.timedelta(minutes=5)).isoformat()}])
            times = [t for t, b in sink.timed()
                     if any(a["labels"]["alertname"] == "Watchdog" for a in b.get("alerts", []))]
            return times if len(times) >= 3 else None

        # Then its receiver hears it again every cooldown, not every group_interval (1 m)
        times = wait_until(watchdog_notifications, 30, interval=0.5, what="three Watchdog notifications")
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        print(f"Watchdog re-notification gaps: {[round(g, 2) for g in gaps]} s (cooldown 3 s)")
        # (the route's group_interval is cooldown + 1 s: Alertmanager re-sends on its ticks)
        assert all(3 <= g <= 5 for g in gaps[:2]), gaps
