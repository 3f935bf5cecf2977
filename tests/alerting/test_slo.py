"""SLOs and error budgets (issue 22): alerting/slos.yml -> prometheus/rules/slo.yml, checked
against the issue's contract, and the promtool tests of prometheus/tests/slo_test.yml shown to
catch a moved objective or burn factor."""

from __future__ import annotations

import re
import shutil
import subprocess
from decimal import Decimal

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from alerting import generate, slo
from mailgenius import metrics
from sender.metrics import REASONS
from tests.alerting.expected import DASHBOARD_UIDS, SLO_ALERTS, SLOS
from tests.conftest import ROOT
from tests.stack import require_binaries

PROMTOOL = "/usr/bin/promtool"
RULE_FILE = ROOT / slo.RULE_FILE
SLO_TEST = ROOT / "prometheus" / "tests" / "slo_test.yml"
#: the issue's objectives, percent over 30 days
OBJECTIVES = {"api-availability": 99.9, "api-latency": 99, "email-delivery": 99, "import-success": 99.5}
#: (severity, [(long window, short window, burn factor)]) of the two alerts (Google SRE workbook)
BURNS = {
    "critical": [("1h", "5m", "14.4"), ("6h", "30m", "6")],
    "warning": [("1d", "2h", "3"), ("3d", "6h", "1")],
}


@pytest.fixture(scope="module")
def model() -> slo.SloModel:
    return slo.load(rules=yaml.safe_load(generate.SOURCE.read_text()))


@pytest.fixture(scope="module")
def groups() -> list[dict]:
    return yaml.safe_load(RULE_FILE.read_text())["groups"]


def test_the_issue_slos_with_their_objectives(model):
    assert {s.name: float(s.objective) for s in model.slos} == OBJECTIVES
    assert model.period == "30d"
    assert {s.name: s.budget for s in model.slos}["api-availability"] == Decimal("0.001")
    assert {(a.name, a.severity) for a in model.alerts} == set(SLO_ALERTS)
    assert tuple(s.name for s in model.slos) == SLOS


def test_each_slo_is_one_group_recording_rules_first_reading_only_its_own_series(groups, model):
    assert [g["name"] for g in groups] == [slo.group_name(s) for s in model.slos]
    for g, s in zip(groups, model.slos, strict=True):
        rules = g["rules"]
        kinds = ["alert" if "alert" in r else "record" for r in rules]
        assert kinds == sorted(kinds, key=lambda k: k == "alert"), f"{g['name']}: an alert before a recording rule"
        assert kinds.count("alert") == 2
        recorded: set[str] = set()
        for r in rules:
            # every slo:* series a rule reads is recorded earlier in the same group (same evaluation)
            for name in re.findall(r"\bslo:[a-z0-9_:]+", r["expr"]):
                assert name in recorded, f"{g['name']}: {r.get('record') or r['alert']} reads {name} before it is recorded"
            for sel in re.findall(r"slo:[a-z0-9_:]+\{([^}]*)\}", r["expr"]):
                assert sel == f'slo="{s.name}"', f"{g['name']} reads another SLO's series: {sel}"
            assert r["labels"]["slo"] == s.name
            if "record" in r:
                recorded.add(r["record"])
        for w in ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d"):
            assert f"slo:sli_error:ratio_rate{w}" in recorded, (g["name"], w)
        for name in (slo.OBJECTIVE, slo.ERROR_BUDGET, slo.CURRENT_BURN_RATE, slo.PERIOD_BURN_RATE,
                     slo.BUDGET_REMAINING, slo.BUDGET_EXHAUSTION, slo.PERIOD_DAYS):
            assert name in recorded, (g["name"], name)


def _pairs(expr: str, budget: str) -> set[tuple[str, str, str]]:
    """(long, short, factor) of each `long > f and short > f` branch of a burn-rate alert."""
    found = set()
    for branch in expr.split("\nor\n"):
        hits = re.findall(r"slo:sli_error:ratio_rate(\w+)\{[^}]*\} / " + re.escape(budget) + r" > ([\d.]+)", branch)
        assert len(hits) == 2 and "and" in branch, branch
        (long_w, f1), (short_w, f2) = hits
        assert f1 == f2
        found.add((long_w, short_w, f1))
    return found


def test_page_and_ticket_burn_windows_and_factors(groups, model):
    for g, s in zip(groups, model.slos, strict=True):
        alerts = {r["labels"]["severity"]: r for r in g["rules"] if "alert" in r}
        assert set(alerts) == {"critical", "warning"}
        for severity, pairs in BURNS.items():
            a = alerts[severity]
            assert a["alert"] == slo.alert_name(s.name)
            assert _pairs(a["expr"], slo._num(s.budget)) == set(pairs), (s.name, severity)
        assert alerts["critical"]["for"] == "2m" and alerts["warning"]["for"] == "15m"


def test_alerts_carry_the_slo_label_a_runbook_and_the_slo_dashboard(model):
    for a in model.alerts:
        assert a.labels == {"severity": a.severity, "slo": a.labels["slo"]}
        assert set(a.annotations) == {"summary", "description", "runbook_url", "dashboard_url"}
        assert "{{" not in a.annotations["summary"] and "{{ $value" in a.annotations["description"]
        assert a.annotations["runbook_url"].endswith(f"/docs/runbooks/{a.name}.md")
        # Grafana's /d/<uid>, or the built-in page's ?dashboard=<uid> when no Grafana is configured
        url = a.annotations["dashboard_url"]
        uid = url.rsplit("/d/", 1)[1] if "/d/" in url else url.rsplit("dashboard=", 1)[1]
        assert uid in DASHBOARD_UIDS, url
        runbook = ROOT / "docs" / "runbooks" / f"{a.name}.md"
        assert runbook.exists(), runbook
        text = runbook.read_text()
        assert text.startswith(f"# {a.name}") and "## Diagnosis" in text and "## Resolution" in text
        assert a.labels["slo"] in text


def test_slos_yml_uses_the_metric_constants():
    source = slo.SOURCE.read_text()
    assert not re.search(r"\bmailgenius_[a-z]", source), "use [[ m.NAME ]] for our own metrics"
    text = RULE_FILE.read_text()
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bmailgenius_[a-z_]+", text)}
    assert used == {metrics.HTTP_REQUESTS, metrics.HTTP_REQUEST_DURATION, metrics.EMAILS_SENT,
                    metrics.EMAIL_SEND_FAILURES, metrics.IMPORT_JOBS}


def test_the_latency_threshold_is_a_bucket_edge_as_the_services_expose_it():
    assert 0.5 in metrics.HTTP_BUCKETS
    registry = CollectorRegistry()
    http = metrics.HttpMetrics(registry)
    http.duration.labels("sender", "GET", "/api/x").observe(0.2)
    exposed = generate_latest(registry).decode()
    assert 'le="0.5"' in exposed
    assert 'le="0.5"' in RULE_FILE.read_text()


def test_delivery_exclusions_are_real_failure_reasons():
    # the SLO leaves out the recipient's own permanent refusal and suppressed addresses; a renamed
    # reason would silently turn them into budget spend
    assert {"rejected", "suppressed"} <= set(REASONS)
    (g,) = [g for g in yaml.safe_load(RULE_FILE.read_text())["groups"] if g["name"] == "mailgenius-slo-email-delivery"]
    assert 'reason!~"rejected|suppressed"' in g["rules"][0]["expr"]


def test_api_slos_leave_out_metrics_scrapes_and_health_checks(groups):
    for g in groups[:2]:
        for r in g["rules"]:
            if "mailgenius_http" in r["expr"]:
                assert 'route!~"/metrics|/api/health(/.*)?"' in r["expr"], r["record"]


def test_the_slo_alerts_are_routed_like_the_others():
    am = yaml.safe_load((ROOT / "alertmanager/alertmanager.yml").read_text())
    routed = {(m[0].split('"')[1], m[1].split('"')[1]) for r in am["route"]["routes"]
              if len(m := r.get("matchers", [])) == 2 and m[0].startswith("alertname=")}
    assert set(SLO_ALERTS) <= routed


def test_the_promtool_tests_order_every_group(groups):
    doc = yaml.safe_load(SLO_TEST.read_text())
    assert doc["rule_files"] == ["../rules/slo.yml"]
    assert doc["group_eval_order"] == [g["name"] for g in groups]
    names = " ".join(t["name"] for t in doc["tests"])
    for s in SLOS:
        for case in ("fast burn", "slow burn", "under budget"):
            assert f"{s}: {case}" in names


@pytest.mark.parametrize(("edit", "message"), [
    (("[[ m.IMPORT_JOBS ]]{status=\"failed\"}", "[[ m.IMPORT_JOB ]]{status=\"failed\"}"), "IMPORT_JOB"),
    (("objective: 99.5", "objective: 100"), "between 0 and 100"),
    (("- [3d, 6h, 1]", "- [3d, 4h, 1]"), "window 4h is not recorded"),
    (("- [1h, 5m, 14.4]", "- [5m, 1h, 14.4]"), "must be longer"),
    (("- name: import-success", "- name: Import_Success"), "kebab-case"),
    (("    good: sum(", "    errors: 0\n    good: sum("), "exactly one of"),
    (("[$window]))\n    total: sum(rate([[ m.HTTP_REQUESTS", "[5m]))\n    total: sum(rate([[ m.HTTP_REQUESTS"),
     "no $window"),
])
def test_an_inconsistent_slos_yml_is_refused_with_a_clear_error(tmp_path, edit, message):
    src = slo.SOURCE.read_text()
    assert edit[0] in src, edit[0]
    path = tmp_path / "slos.yml"
    path.write_text(src.replace(edit[0], edit[1], 1))
    with pytest.raises(generate.RulesError, match=re.escape(message)):
        generate.render(slo_source=path)


#: api-availability's alert expression, as rendered
_AVAIL = 'slo:sli_error:ratio_rate{w}{{slo="api-availability"}} / 0.001 > {f}'


@pytest.mark.parametrize(("source_edit", "rule_edit", "what"), [
    # in slos.yml (the annotations name the factors too)
    (("- [1d, 2h, 3]", "- [1d, 2h, 6]"), None, "a ticket factor above the slow burn"),
    (("objective: 99.9", "objective: 99.95"), None, "a tighter availability objective"),
    # in the rendered expression only (annotations unchanged): the cases must see the behaviour
    (None, (_AVAIL.format(w="1h", f="14.4"), _AVAIL.format(w="1h", f="21")), "the 1h/5m page factor"),
    (None, (_AVAIL.format(w="6h", f="6"), _AVAIL.format(w="6h", f="7")), "the 6h/30m page factor"),
    (None, (_AVAIL.format(w="30m", f="6"), _AVAIL.format(w="6h", f="6")), "the 30m short window (the page would not reset)"),
    (None, (_AVAIL.format(w="5m", f="14.4"), _AVAIL.format(w="1h", f="14.4")), "the 5m short window"),
])
def test_the_promtool_tests_catch_a_moved_factor_objective_or_window(tmp_path, source_edit, rule_edit, what):
    require_binaries(PROMTOOL)
    # Given slo.yml rendered from a slos.yml with one number moved, or with one term of an
    # alert expression changed
    src = slo.SOURCE.read_text()
    if source_edit:
        assert source_edit[0] in src
        src = src.replace(source_edit[0], source_edit[1], 1)
    path = tmp_path / "slos.yml"
    path.write_text(src)
    text = generate.render(slo_source=path)[slo.RULE_FILE]
    if rule_edit:
        assert rule_edit[0] in text, rule_edit[0]
        text = text.replace(rule_edit[0], rule_edit[1])
    generate.write({slo.RULE_FILE: text}, tmp_path)
    (tmp_path / "prometheus/tests").mkdir(parents=True)
    shutil.copy(SLO_TEST, tmp_path / "prometheus/tests/slo_test.yml")
    # When the committed unit tests run against it
    res = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "prometheus/tests/slo_test.yml")],
                         capture_output=True, text=True, timeout=300)
    # Then they fail
    assert res.returncode != 0, f"{what} went unnoticed"
