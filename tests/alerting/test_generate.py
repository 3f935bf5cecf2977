"""alerting/rules.yml -> generated files: up to date, complete, consistent with the contract."""

from __future__ import annotations

import os
import re
import stat

import pytest
import yaml

from alerting import cli as alerting_cli
from alerting import generate
from tests.alerting.expected import ALERTS, DASHBOARD_UIDS, WATCHDOG, expected
from tests.conftest import ROOT

RUNBOOKS = ROOT / "docs" / "runbooks"


@pytest.fixture(scope="module")
def model():
    return generate.load()


def test_committed_files_are_up_to_date():
    # Given the committed rules, configs and rule files
    # When they are regenerated from alerting/rules.yml without writing
    changed = generate.build(ROOT, check=True)
    # Then nothing would change
    assert changed == [], f"run `mailgenius build`: stale {[str(p.relative_to(ROOT)) for p in changed]}"


def test_build_reports_and_repairs_a_stale_file(tmp_path):
    # Given a fresh tree with one generated file edited by hand and a leftover rule file
    assert sorted(p.name for p in generate.build(tmp_path)) != []
    target = tmp_path / "prometheus" / "rules" / "system.yml"
    target.write_text(target.read_text().replace("0.8", "0.7"))
    (tmp_path / "prometheus" / "rules" / "old-group.yml").write_text("groups: []\n")
    # When checked, then built
    assert set(generate.build(tmp_path, check=True)) == {target, tmp_path / "prometheus/rules/old-group.yml"}
    generate.build(tmp_path)
    # Then the edit is undone and the leftover removed
    assert generate.build(tmp_path, check=True) == []
    assert not (tmp_path / "prometheus/rules/old-group.yml").exists()


def test_every_documented_alert_is_defined_with_its_severity_cooldown_and_channels(model):
    defined = {(a.name, a.severity): a for a in model.alerts}
    assert set(defined) == set(ALERTS) | {WATCHDOG}
    for key, alert in defined.items():
        cooldown, channels = expected(*key)
        assert generate.duration_seconds(alert.cooldown, key) == cooldown, key
        assert set(alert.channels) == channels, key


def test_documented_thresholds_appear_in_the_expressions(model):
    # the number each docs/design.md condition names, in the rendered PromQL
    by_name = {(a.name, a.severity): a.expr for a in model.alerts}
    recorded = {r["record"]: r["expr"] for r in model.recording}
    wanted = {
        ("HighAPILatency", "warning"): "> 0.5", ("DatabaseConnectionsHigh", "critical"): "> 0.8",
        ("EmailDeliveryRateLow", "warning"): "< 0.95", ("QueueDepthHigh", "critical"): "> 1000",
        ("HighCPUUsage", "warning"): "> 0.8", ("HighMemoryUsage", "warning"): "> 0.85",
        ("DiskSpaceLow", "critical"): "> 0.9", ("RedisMemoryHigh", "warning"): "> 0.75",
        ("DatabaseCacheHitRatioLow", "warning"): "< 0.9", ("ErrorRateHigh", "warning"): "> 0.01",
        ("WorkerFailureRateHigh", "warning"): "> 0.05", ("BounceRateHigh", "warning"): "> 0.05",
        ("ImportFailureRateHigh", "warning"): "> 0.05", ("CampaignFailureRateHigh", "warning"): "> 0.02",
    }
    for key, comparison in wanted.items():
        assert by_name[key].rstrip().endswith(comparison), (key, by_name[key])
    # every recording rule an alert uses exists
    for expr in by_name.values():
        for name in re.findall(r"(?<![\w:])[a-z_]*:[a-z0-9_]+:[a-z0-9_]+", expr):
            assert name in recorded, name


def test_own_metric_names_come_from_mailgenius_metrics(model):
    # rules.yml never spells one of our metric names in an expression: it uses the constants
    # (recorded series names, level:metric:operations, carry the metric name they derive from)
    source = re.sub(r"record: \S+", "", generate.SOURCE.read_text())
    assert not re.search(r"\bmailgenius_[a-z]", source), "use [[ m.NAME ]] for our own metrics"
    known = set(generate.metric_names().values())
    exprs = [a.expr for a in model.alerts] + [r["expr"] for r in model.recording]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs
            for n in re.findall(r"(?<![\w:])mailgenius_[a-z_]+", e)}
    assert used, "the rules use none of our metrics?"
    assert used <= known, used - known


def test_an_unknown_metric_constant_breaks_the_build(tmp_path):
    src = generate.SOURCE.read_text().replace("[[ m.QUEUE_MESSAGES ]]", "[[ m.QUEUE_MESSAGE ]]", 1)
    path = tmp_path / "rules.yml"
    path.write_text(src)
    with pytest.raises(generate.RulesError, match="QUEUE_MESSAGE"):
        generate.render(source=path)


@pytest.mark.parametrize(("edit", "message"), [
    (("channels: [email]", "channels: [email, sms]"), "unknown channel 'sms'"),
    (("cooldown: 60s", "cooldown: soon"), "not a duration"),
    (("- name: ImportStalled", "- name: import_stalled"), "PascalCase"),
    (("[[ t.queue_waiting_messages ]]", "[[ t.queue_waiting ]]"), "queue_waiting"),
])
def test_inconsistent_rules_are_refused_with_a_clear_error(tmp_path, edit, message):
    src = generate.SOURCE.read_text()
    assert edit[0] in src
    path = tmp_path / "rules.yml"
    path.write_text(src.replace(edit[0], edit[1], 1))
    with pytest.raises(generate.RulesError, match=re.escape(message)):
        generate.render(source=path)


def test_annotations_carry_summary_description_runbook_and_dashboard(model):
    for a in model.alerts:
        ann = a.annotations
        assert set(ann) == {"summary", "description", "runbook_url", "dashboard_url"}
        assert "{{" not in ann["summary"], f"{a.name}: the summary is static"
        if a.name != "Watchdog":
            assert "{{" in ann["description"], f"{a.name}: the description is templated"
        assert ann["runbook_url"].endswith(f"/docs/runbooks/{a.name}.md")
        # Grafana's /d/<uid>, or the monitoring page's ?dashboard=<uid> when no Grafana is configured
        uid = re.split(r"/d/|[?&]dashboard=", ann["dashboard_url"])[-1]
        assert uid in DASHBOARD_UIDS, (a.name, uid)


def test_every_alert_has_a_runbook_with_diagnosis_and_resolution(model):
    for name in {a.name for a in model.alerts}:
        path = RUNBOOKS / f"{name}.md"
        assert path.exists(), f"missing runbook {path.relative_to(ROOT)}"
        text = path.read_text()
        assert text.startswith(f"# {name}"), path
        for section in ("## Diagnosis", "## Resolution"):
            assert section in text, f"{path.name}: no {section}"


def test_prometheus_configs_scrape_every_component_with_a_service_label():
    jobs = {"sender", "importer", "exporter", "sender-worker", "importer-worker", "scheduler", "postgres", "redis",
            "node", "alertmanager", "prometheus"}
    local = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    targets = {c["job_name"]: c["static_configs"][0] for c in local["scrape_configs"]}
    assert set(targets) == jobs
    ports = {"sender": 8001, "importer": 8002, "exporter": 9300, "sender-worker": 9191, "importer-worker": 9192,
             "scheduler": 9194, "postgres": 9187, "redis": 9121, "node": 9100, "alertmanager": 9093, "prometheus": 9090}
    for job, sc in targets.items():
        assert sc["targets"] == [f"127.0.0.1:{ports[job]}"], job
        assert sc["labels"] == {"service": job}
    assert local["rule_files"] == ["rules/*.yml"]
    assert local["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]

    compose = yaml.safe_load((ROOT / "prometheus/prometheus.compose.yml").read_text())
    hosts = {}
    for c in compose["scrape_configs"]:
        if "dns_sd_configs" in c:
            hosts[c["job_name"]] = c["dns_sd_configs"][0]["names"][0]
            assert c["relabel_configs"] == [{"target_label": "service", "replacement": c["job_name"]}]
        else:
            hosts[c["job_name"]] = c["static_configs"][0]["targets"][0].split(":")[0]
            assert c["static_configs"][0]["labels"] == {"service": c["job_name"]}
    assert set(hosts) == jobs
    compose_services = {"sender", "sender-worker", "importer", "importer-worker", "exporter", "scheduler",
                        "alertmanager", "postgres-exporter", "redis-exporter", "node-exporter"}
    assert set(hosts.values()) - {"localhost"} <= compose_services


def test_no_secret_is_committed_and_secrets_are_read_from_files():
    for name in ("alertmanager.yml", "alertmanager.compose.yml"):
        cfg = yaml.safe_load((ROOT / "alertmanager" / name).read_text())
        for r in cfg["receivers"]:
            for s in r.get("slack_configs", []):
                assert "api_url" not in s and s["api_url_file"].endswith("/slack_api_url")
                assert s["channel"] == "#alerts"
            for p in r.get("pagerduty_configs", []):
                assert "routing_key" not in p and "service_key" not in p
                assert p["routing_key_file"].endswith("/pagerduty_routing_key")
            for e in r.get("email_configs", []):
                assert "auth_password" not in e
    text = (ROOT / "alertmanager/alertmanager.yml").read_text()
    assert "hooks.slack" not in text


def test_secrets_command_writes_private_files_from_the_environment(tmp_path):
    env = {"MAILGENIUS_SLACK_WEBHOOK_URL": "http://127.0.0.1:1/hook", "MAILGENIUS_PAGERDUTY_ROUTING_KEY": "k" * 32}
    status = alerting_cli.write_secrets(tmp_path / "secrets", env)
    assert status == {"slack_api_url": "written", "pagerduty_routing_key": "written", "smtp_password": "missing",
                      "alert_webhook_token": "missing"}
    path = tmp_path / "secrets" / "pagerduty_routing_key"
    assert path.read_text() == "k" * 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "secrets").st_mode) == 0o700
    # a later run without the variables keeps what is there
    assert alerting_cli.write_secrets(tmp_path / "secrets", {})["slack_api_url"] == "kept"


def test_a_moved_variant_renders_every_port_and_the_test_timings(tmp_path):
    v = generate.local_variant(ports={"sender": 18001, "alertmanager": 19093, "smtp": 11025, "exporter": 19300},
                               scrape_interval="1s", evaluation_interval="1s", group_wait="1s",
                               group_interval="2s", for_override="3s", secrets_dir=str(tmp_path / "s"),
                               pagerduty_url="http://127.0.0.1:9/v2/enqueue")
    paths = generate.render_to(tmp_path, v)
    prom = yaml.safe_load(paths["prometheus"].read_text())
    assert prom["global"]["scrape_interval"] == "1s"
    assert {"targets": ["127.0.0.1:18001"], "labels": {"service": "sender"}} in [
        c["static_configs"][0] for c in prom["scrape_configs"]]
    am = yaml.safe_load(paths["alertmanager"].read_text())
    assert am["global"]["smtp_smarthost"] == "127.0.0.1:11025"
    assert am["route"]["group_wait"] == "1s" and am["route"]["group_interval"] == "2s"
    hooks = [w["url"] for r in am["receivers"] for w in r.get("webhook_configs", [])]
    assert "http://127.0.0.1:19300/api/alerts/webhook" in hooks
    pd = [p for r in am["receivers"] for p in r.get("pagerduty_configs", [])]
    assert pd and all(p["url"] == "http://127.0.0.1:9/v2/enqueue" for p in pd)
    rules = yaml.safe_load((paths["rules"] / "application.yml").read_text())
    assert {r["for"] for r in rules["groups"][0]["rules"]} == {"3s"}


def test_cli_render_moves_ports_and_refuses_an_unknown_job(tmp_path, capsys):
    from console.commands import main

    assert main(["alerting", "render", "--out", str(tmp_path), "--port", "exporter=19300", "--interval", "1s"]) == 0
    am = yaml.safe_load((tmp_path / "alertmanager/alertmanager.yml").read_text())
    assert am["receivers"][0]["webhook_configs"][0]["url"] == "http://127.0.0.1:19300/api/alerts/webhook"
    assert main(["alerting", "render", "--out", str(tmp_path), "--port", "grafana=3000"]) == 2
    assert "--port expects JOB=PORT" in capsys.readouterr().err


def test_channel_urls_in_rules_yml_override_the_defaults(tmp_path):
    src = yaml.safe_load(generate.SOURCE.read_text())
    src["channels"]["watchdog"]["url"] = "http://deadman.invalid/ping/abc"
    src["channels"]["pagerduty"]["url"] = "http://pd-proxy.invalid/v2/enqueue"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(src))
    am = yaml.safe_load(generate.render(source=path)["alertmanager/alertmanager.yml"])
    (watchdog,) = [r for r in am["receivers"] if r["name"] == "watchdog"]
    assert watchdog["webhook_configs"][0]["url"] == "http://deadman.invalid/ping/abc"
    assert am["global"]["pagerduty_url"] == "http://pd-proxy.invalid/v2/enqueue"
    # the committed defaults: the exporter's webhook (it ignores the Watchdog) and PagerDuty itself
    committed = yaml.safe_load((ROOT / "alertmanager/alertmanager.yml").read_text())
    (watchdog,) = [r for r in committed["receivers"] if r["name"] == "watchdog"]
    assert watchdog["webhook_configs"][0]["url"] == "http://127.0.0.1:9300/api/alerts/webhook"
    assert "pagerduty_url" not in committed["global"]


def test_dashboard_links_follow_mailgenius_grafana_url_or_fall_back_to_the_monitoring_page(monkeypatch, tmp_path):
    # committed files: no Grafana configured -> the exporter's built-in page (make run has no Grafana)
    text = (ROOT / "prometheus" / "rules" / "system.yml").read_text()
    assert "127.0.0.1:3000" not in text
    assert "http://127.0.0.1:9300/dashboard/monitoring?dashboard=system-health" in text
    # a stack rendered for moved ports: the page at the exporter's port ...
    monkeypatch.delenv("MAILGENIUS_GRAFANA_URL", raising=False)
    rules = generate.render(generate.local_variant(ports={"exporter": 19300}))["prometheus/rules/system.yml"]
    assert "http://127.0.0.1:19300/dashboard/monitoring?dashboard=system-health" in rules
    # ... or the Grafana the operator names
    monkeypatch.setenv("MAILGENIUS_GRAFANA_URL", "https://grafana.example.com/")
    rules = generate.render(generate.local_variant(ports={"exporter": 19300}))["prometheus/rules/system.yml"]
    assert "https://grafana.example.com/d/system-health" in rules
    assert "/dashboard/monitoring" not in rules


def test_watchdog_feeds_the_dead_mans_switch_named_by_mailgenius_watchdog_url(monkeypatch):
    def watchdog_hooks(text: str) -> list[str]:
        cfg = yaml.safe_load(text)
        route = next(r for r in cfg["route"]["routes"] if 'alertname="Watchdog"' in r.get("matchers", []))
        (receiver,) = [r for r in cfg["receivers"] if r["name"] == route["receiver"]]
        return [h["url"] for h in receiver.get("webhook_configs", [])]

    monkeypatch.delenv("MAILGENIUS_WATCHDOG_URL", raising=False)
    files = generate.render(generate.local_variant(ports={"exporter": 19300}))
    assert watchdog_hooks(files["alertmanager/alertmanager.yml"]) == ["http://127.0.0.1:19300/api/alerts/webhook"]
    monkeypatch.setenv("MAILGENIUS_WATCHDOG_URL", "https://hc.example.com/ping/abc")
    files = generate.render(generate.local_variant(ports={"exporter": 19300}))
    assert watchdog_hooks(files["alertmanager/alertmanager.yml"]) == ["https://hc.example.com/ping/abc"]
