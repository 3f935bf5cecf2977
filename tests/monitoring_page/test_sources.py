"""The page's fixed PromQL allow-list: every expression, for every range, is valid PromQL
(checked by the real promtool), and range queries stay within Prometheus's point limit."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from exporter.monitoring_page import sources
from mailgenius import metrics as m

PROMTOOL = "/usr/bin/promtool"


def all_expressions() -> list[tuple[str, str]]:
    out = []
    for name, rng in sources.RANGES.items():
        for chart in sources.CHARTS:
            for s in chart.series:
                out.append((f"{chart.id}:{name}", sources.expand(s.expr, rng, name)))
        for stat, (_unit, expr) in sources.STATS.items():
            out.append((f"{stat}:{name}", sources.expand(expr, rng, name)))
    return out


def test_every_expression_is_valid_promql(tmp_path):
    # Given every query the page may send, as recording rules (promtool parses their exprs)
    rules = {"groups": [{"name": "page", "rules": [
        {"record": f"page:check_{i}", "expr": expr} for i, (_n, expr) in enumerate(all_expressions())
    ]}]}
    path = tmp_path / "page-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    # When promtool checks them / Then it accepts them all
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # and no placeholder was left unexpanded
    assert not [e for _n, e in all_expressions() if "$" in e]


def test_queries_use_the_contract_metric_names():
    text = " ".join(e for _n, e in all_expressions())
    for name in (m.HTTP_REQUEST_DURATION, m.HTTP_REQUESTS, m.EMAILS_SENT, m.EMAIL_EVENTS,
                 m.IMPORT_ROWS, m.QUEUE_MESSAGES, m.WORKERS):
        assert name in text


@pytest.mark.parametrize("name", list(sources.RANGES))
def test_ranges_stay_under_the_point_limit(name):
    rng = sources.RANGES[name]
    assert rng.seconds / rng.step <= 11_000  # Prometheus refuses more points per series
    assert rng.seconds / rng.step >= 200     # and a chart needs enough points to read


def test_legends_fill_labels():
    assert sources._legend("{queue} dead", {"queue": "lead-import"}) == "lead-import dead"
    assert sources._legend("{outcome}", {}) == "value"
    assert sources._legend("p95", {"le": "x"}) == "p95"
