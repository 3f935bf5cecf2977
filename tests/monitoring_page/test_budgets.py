"""The page's "Error budgets" source against a real Prometheus evaluating the generated
prometheus/rules/slo.yml (issue 22)."""

from __future__ import annotations

import textwrap

import pytest

from alerting import slo
from exporter.monitoring_page import budgets, setup_monitoring_page
from exporter.monitoring_page.routes import API
from mailgenius.web import base_app
from tests.conftest import ROOT
from tests.monitoring_page.conftest import login
from tests.stack import PROMETHEUS, Stack, require_binaries, wait_until


def test_the_page_reads_the_series_the_slo_rules_record():
    # the page reads the names from the kernel (mailgenius.slo_series), as alerting/slo.py does;
    # the rules really record them
    assert budgets.SERIES == {
        "objective": slo.OBJECTIVE, "error_budget": slo.ERROR_BUDGET, "budget_remaining": slo.BUDGET_REMAINING,
        "burn_rate_1h": slo.CURRENT_BURN_RATE, "error_ratio_30d": slo.ratio_name("30d"),
        "exhaustion_seconds": slo.BUDGET_EXHAUSTION,
    }
    assert slo.CURRENT_WINDOW == "1h"
    recorded = (ROOT / slo.RULE_FILE).read_text()
    for name in budgets.SERIES.values():
        assert f'record: "{name}"' in recorded, name


async def test_budgets_when_prometheus_is_down_say_so(page_client, make_key):
    await login(page_client, await make_key("read"))
    resp = await page_client.get(f"{API}/slos")
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is False and body["error"].startswith("Prometheus unreachable") and body["slos"] == []


#: traffic made by recording rules (a recorded value that grows with time is a counter to rate()):
#: 100 requests/s answered, 1/s failing with a 500 -> error ratio 1/101, 9.9x the 0.1 % budget;
#: and a firing ticket of the same SLO
SYNTHETIC = textwrap.dedent("""\
    groups:
      - name: synthetic-traffic
        interval: 1s
        rules:
          - record: mailgenius_http_requests_total
            expr: vector(time() * 100)
            labels: {service: sender, method: POST, route: /api/emails, status: "202"}
          - record: mailgenius_http_requests_total
            expr: vector(time())
            labels: {service: sender, method: POST, route: /api/emails, status: "500"}
          - record: mailgenius_http_requests_total
            expr: vector(time() * 1000)
            labels: {service: sender, method: GET, route: /api/health, status: "503"}
          - alert: SloApiAvailabilityBudgetBurn
            expr: vector(1)
            labels: {severity: warning, slo: api-availability}
    """)


@pytest.fixture
def prometheus(settings, tmp_path):
    require_binaries(PROMETHEUS)
    stack = Stack(settings, tmp_path)
    rules = tmp_path / "synthetic.yml"
    rules.write_text(SYNTHETIC)
    stack.start_prometheus(stack.prometheus_config(jobs={}, alertmanager=False,
                                                   rule_files=[str(rules), str(ROOT / slo.RULE_FILE)]))
    try:
        yield stack
    finally:
        stack.stop_all()


async def test_budgets_per_slo_from_the_recorded_series(aiohttp_client, settings, pool, make_key, prometheus):
    # Given Prometheus evaluating slo.yml over the synthetic traffic
    wait_until(lambda: prometheus.prom_query(f'{slo.BUDGET_EXHAUSTION}{{slo="api-availability"}}')
               and prometheus.prom_query('ALERTS{alertstate="firing",slo="api-availability"}'), 30,
               what="the SLO rules to record the budget of api-availability")
    app = base_app(settings.replace(prometheus_url=prometheus.url("prometheus")), "exporter")
    setup_monitoring_page(app)
    client = await aiohttp_client(app)
    await login(client, await make_key("read"))
    # When the page asks for the budgets
    body = await (await client.get(f"{API}/slos")).json()
    # Then every SLO of slos.yml is there, by name
    assert body["ok"] is True and body["error"] is None
    rows = {r["slo"]: r for r in body["slos"]}
    assert list(rows) == sorted(s for s in ("api-availability", "api-latency", "email-delivery", "import-success"))
    api = rows["api-availability"]
    assert api["objective"] == pytest.approx(0.999) and api["error_budget"] == pytest.approx(0.001)
    # the health checks' 503s are not API traffic: 1 of 101 requests failed -> 9.9x the budget
    assert api["burn_rate_1h"] == pytest.approx(1 / 101 / 0.001, rel=0.02)
    assert api["error_ratio_30d"] == pytest.approx(1 / 101, rel=0.02)
    assert api["budget_remaining"] == pytest.approx(1 - 1 / 101 / 0.001, rel=0.02)
    assert api["exhaustion_seconds"] == 0  # overspent: nothing left
    assert api["alert"] == "ticket"
    # SLOs without traffic show their objective and nothing else
    latency = rows["api-latency"]
    assert latency["objective"] == pytest.approx(0.99)
    assert latency["burn_rate_1h"] is None and latency["budget_remaining"] is None and latency["alert"] is None
