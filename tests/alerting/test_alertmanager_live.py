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
        def states():
            alerts = stack.alerts()
            return {(a["labels"]["severity"], a["labels"]["mountpoint"]): a["status"] for a in alerts} if len(alerts) == 3 else None

        status = wait_until(states, 10, what="three alerts in Alertmanager")
        assert status[("critical", "/")]["state"] == "active"
        assert status[("warning", "/data")]["state"] == "active"
        assert status[("warning", "/")]["state"] == "suppressed"
        assert status[("warning", "/")]["inhibitedBy"], status
