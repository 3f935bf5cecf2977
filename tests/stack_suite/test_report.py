"""`mailgenius report` against a real Prometheus: with no application data every section still
renders and each chart says "no data" instead of drawing an empty frame; with the exporters
scraped, the resource section has real figures and charts. (The full report after real traffic
is checked in test_make_run.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from console import report
from tests.stack import (
    NODE_EXPORTER,
    POSTGRES_EXPORTER,
    PROMETHEUS,
    REDIS_EXPORTER,
    require_binaries,
    wait_until,
)

MAILGENIUS = str(Path(sys.executable).parent / "mailgenius")
CHART = re.compile(r'<figure class="chart" data-title="([^"]+)" data-series="(\d+)" data-points="(\d+)">\s*'
                   r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _report(stack, settings, tmp_path, kind: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / f"{kind}.html"
    env = stack.env(MAILGENIUS_DATA_DIR=str(tmp_path / "var"))
    res = subprocess.run([MAILGENIUS, "report", kind, "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=120)
    return res, out.read_text() if out.exists() else ""


def test_report_of_an_empty_prometheus_says_no_data(stack, settings, tmp_path, pool):
    require_binaries(PROMETHEUS)
    # Given a Prometheus that scrapes nothing
    stack.start_prometheus(jobs={}, alertmanager=False)
    # When the weekly report is generated
    res, html = _report(stack, settings, tmp_path, "weekly")
    # Then it succeeds, every section is there, and each chart is an honest "no data"
    assert res.returncode == 0, res.stderr
    charts = CHART.findall(html)
    assert len(charts) >= 10
    assert all(series == "0" and "no data" in alt for _, series, _, alt, _ in charts)
    assert "no data yet for:" in res.stdout
    for n, section in enumerate(("System performance", "Errors and incidents", "Email delivery", "Queues",
                                 "Resource use", "Trends", "Recommendations"), start=1):
        assert f"{n}. {section}" in html
    assert "no action needed" in html
    assert "MailGenius weekly performance report" in html


def test_report_resource_section_from_the_real_exporters(stack, settings, tmp_path, pool):
    require_binaries(PROMETHEUS, NODE_EXPORTER, POSTGRES_EXPORTER, REDIS_EXPORTER)
    # Given Prometheus scraping the node, Postgres and Redis exporters every second
    stack.start_exporters()
    stack.start_prometheus(alertmanager=False)
    stack.wait_targets_up(timeout=30)
    wait_until(lambda: stack.prom_query('rate(node_cpu_seconds_total{mode="idle"}[1m])'), 20, interval=0.5,
               what="two node exporter scrapes")
    # When the daily report is generated
    res, html = _report(stack, settings, tmp_path, "daily")
    assert res.returncode == 0, res.stderr
    charts = {title: (int(series), int(points)) for title, series, points, _, _ in CHART.findall(html)}
    # Then the resource charts have data and the figures are numbers
    assert charts["CPU, memory and disk use"][0] == 3 and charts["CPU, memory and disk use"][1] > 0
    assert charts["Postgres connections and Redis memory"][0] == 2
    section = html.split("5. Resource use")[1].split("6. Trends")[0]
    figures = dict(re.findall(r'<div class="label">([^<]+)</div><div class="value">([^<]+)</div>', section))
    assert re.match(r"^\d+\.\d %$", figures["memory"]), figures
    assert re.match(r"^\d+ / \d+$", figures["Postgres connections"]), figures
    # and the application charts, with no application scraped, say so
    assert charts["Emails sent per second by provider"][0] == 0


def test_recommendations_follow_the_guide_thresholds():
    # the thresholds the recommendations use are the operations guide's numbers
    t = report.THRESHOLDS
    assert (t["p95_seconds"], t["error_ratio"], t["delivery_ratio"], t["bounce_ratio"], t["queue_waiting"]) == \
        (0.5, 0.01, 0.95, 0.05, 1000)
    assert (t["cpu_percent"], t["memory_percent"], t["disk_percent"], t["cache_hit_ratio"], t["db_connections_ratio"]) == \
        (80, 85, 90, 0.90, 0.80)
