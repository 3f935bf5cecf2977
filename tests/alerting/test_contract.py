"""One contract: a threshold or a selector moved in (a copy of) alerting/rules.yml moves in every
reader after `mailgenius build`: the alert expression and texts, the dashboards' colours and
descriptions, the health checks, the operator summary, the monitoring page and the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alerting import generate
from mailgenius import contract

ROOT = Path(__file__).resolve().parents[2]
MAILGENIUS = str(Path(sys.executable).parent / "mailgenius")

#: prints what every reader uses, as JSON (run with MAILGENIUS_RULES_FILE set)
READERS = r"""
import json
from exporter import health, summary
from exporter.monitoring_page import sources
from console import report
from mailgenius import queues, contract
import inspect
c = contract.get()
print(json.dumps({
    "contract": str(c.path),
    "health_queue": health.queue_depth_degraded(),
    "kernel_queue_check": inspect.getclosurevars(queues.queue_check(None, None, "q")).nonlocals["max_waiting"],
    "report": report.report_thresholds(),
    "summary_queries": summary.scalar_queries(),
    "page_stats": {k: e for k, (_u, e) in sources.STATS.items()},
    "page_charts": [s.expr for ch in sources.CHARTS for s in ch.series],
    "disk_record": c.recorded("disk_usage").expr,
}))
"""


def _copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for d in ("alerting", "dashboards", "prometheus", "alertmanager", "deploy", "docs"):
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    # the Kubernetes generator tags images with the project's version
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_a_moved_threshold_and_selector_reach_every_reader(tmp_path):
    # Given a copy of the repository whose rules.yml moves QueueDepthHigh to 777 waiting
    # messages, the API error threshold to 2 %, and changes two selectors
    root = _copy_repo(tmp_path)
    rules = root / "alerting" / "rules.yml"
    text = rules.read_text()
    edits = [("queue_waiting_messages: 1000", "queue_waiting_messages: 777"),
             ("http_error_ratio: 0.01", "http_error_ratio: 0.02"),
             ("api_requests: 'route!=\"/metrics\"'", "api_requests: 'route!~\"/metrics|/api/health.*\"'"),
             ("fstype!~\"tmpfs|", "fstype!~\"zfs|tmpfs|")]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    rules.write_text(text)
    env = {**os.environ, contract.ENV: ""}
    env.pop(contract.ENV)

    # When it is built
    res = subprocess.run([MAILGENIUS, "build", "--root", str(root)], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    # Then the alert compares with 777 and says so in its summary and description
    app = (root / "prometheus" / "rules" / "application.yml").read_text()
    block = app.split('alert: "QueueDepthHigh"')[1].split("- alert:")[0]
    assert "> 777'" in block and "More than 777 messages" in block and "(threshold 777)" in block, block
    assert "1000" not in block
    err = app.split('alert: "ErrorRateHigh"')[1].split("- alert:")[0]
    assert "> 0.02'" in err and "More than 2 % of API requests" in err and "(threshold 2 %)" in err
    rec = (root / "prometheus" / "rules" / "recording.yml").read_text()
    assert 'route!~"/metrics|/api/health.*"' in rec and 'fstype!~"zfs|tmpfs|' in rec
    # and the dashboards colour and describe the queue at 777 (warning at half of it)
    queue = json.loads((root / "dashboards" / "json" / "queue-health.json").read_text())
    waiting = next(p for p in queue["panels"] if p.get("title") == "Waiting messages")
    steps = [s["value"] for s in waiting["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 388.5, 777], steps
    assert "777" in waiting["description"]
    system = (root / "dashboards" / "json" / "system-health.json").read_text()
    assert "zfs|tmpfs" in system and "/metrics|/api/health" in system

    # And the health checks, the summary, the page and the report read the same contract
    env[contract.ENV] = str(rules)
    out = subprocess.run([sys.executable, "-c", READERS], capture_output=True, text=True, timeout=120,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["contract"] == str(rules)
    assert got["health_queue"] == 777 and got["kernel_queue_check"] == 777
    assert got["report"]["queue_waiting"] == 777 and got["report"]["error_ratio"] == 0.02
    assert 'route!~"/metrics|/api/health.*"' in got["summary_queries"]["api_p50"]
    assert 'route!~"/metrics|/api/health.*"' in got["page_stats"]["api_p50"]
    assert all('route!~"/metrics|/api/health.*"' in e for e in got["page_charts"] if "http_request" in e)
    assert 'fstype!~"zfs|tmpfs|' in got["disk_record"]


def test_the_repository_readers_use_the_committed_contract():
    # the default contract is alerting/rules.yml, the file `mailgenius build` renders the rules from
    c = contract.get()
    assert c.path == generate.SOURCE
    assert c.threshold("queue_waiting_messages") == 1000
    assert set(c.recording) >= {"api_latency_p95_all", "email_delivery_ratio_all", "email_bounce_ratio_all",
                                "email_open_ratio_all", "email_click_ratio_all", "queue_waiting", "disk_usage"}
    with pytest.raises(contract.ContractError, match="no threshold 'nope'"):
        c.threshold("nope")


@pytest.mark.parametrize(("value", "pct", "ms"), [(0.8, "80 %", "800 ms"), (0.001, "0.1 %", "1 ms"),
                                                 (0.5, "50 %", "500 ms"), (0.95, "95 %", "950 ms")])
def test_alert_text_formats(value, pct, ms):
    assert contract.percent(value) == pct and contract.milliseconds(value) == ms


def test_recorded_series_follow_the_naming_convention():
    # level:metric:operations, the level being the labels the series keeps
    for r in contract.get().recording.values():
        level, metric, ops = r.series.split(":")
        assert metric and ops, r.series
        if not level:
            assert not r.by, r
        # every label it aggregates by is named in the level (service rides along with instance)
        assert set(r.by) - {"service"} <= set(level.split("_")), r


def test_the_metrics_catalogue_is_generated_from_the_code():
    # docs/metrics.md is what `mailgenius build` renders from mailgenius/metrics.py and rules.yml
    from mailgenius import catalogue
    from mailgenius import metrics as m

    assert catalogue.build(ROOT, check=True) == [], "run `mailgenius build`"
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str) and v.startswith(m.PREFIX)
             and k != "PREFIX"}
    documented = {e[2] for e in catalogue.entries()}
    assert documented == names, names ^ documented
    for name in names:
        assert f"| `{name}` |" in text, name
    assert all(e[3] and e[4] for e in catalogue.entries()), "every metric has a type and a meaning"
    for r in contract.get().recording.values():
        assert f"`{r.series}`" in text
