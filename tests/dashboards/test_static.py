"""The dashboards as Grafana would load them: generation, JSON validity, layout, datasources,
links, variables, PromQL syntax (promtool), metric names, LogQL labels against Alloy."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import generate, helpers
from dashboards.queries import (
    BUILTINS,
    iter_panels,
    iter_queries,
    logql_labels,
    metric_names,
    substitute,
    used_variables,
)
from mailgenius import contract
from mailgenius import metrics as M
from tests.conftest import IN_CI, ROOT

UIDS = sorted(helpers.DASHBOARDS)
#: Panel types Grafana 10 ships (no plugin needed).
BUILTIN_PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "logs", "text",
                       "alertlist", "alertGroups", "state-timeline", "barchart", "heatmap", "piechart", "histogram"}
PROMTOOL = "/usr/bin/promtool"
#: the operations guide we implement (a copy of the guide, so a clone is self-contained)
GUIDE = ROOT / "docs" / "operations-guide.md"
#: The operations guide's dashboard sections (a copy, for when the guide is not beside the repo).
GUIDE_BULLETS = {
    "system-health": ["Status Geral", "Serviços Monitorados", "Uptime", "Response Times"],
    "import-progress": ["Active Jobs", "Queue Status", "Processing Rate", "Error Rate", "CSV Validation"],
    "email-metrics": ["Delivery Statistics", "Engagement Metrics", "Provider Performance",
                      "Campaign Analytics", "Real-time Throughput"],
    "queue-health": ["Queue Depth", "Processing Rate", "Worker Status", "Job Statistics", "Error Tracking"],
    "alerts-incidents": ["Active Alerts", "Alert Rules", "Incident Timeline", "MTTR/MTBF"],
    "structured-logs": ["Real-time Logs", "Log Filtering", "Search Capability", "Export Features"],
}


def _copy_sources(dest: Path) -> Path:
    (dest / "dashboards").mkdir(parents=True)
    for src in (ROOT / "dashboards").glob("*.dashboard.py"):
        shutil.copy(src, dest / "dashboards" / src.name)
    return dest


# -- generation ------------------------------------------------------------------------------

def test_committed_files_match_the_generator():
    # Given the committed JSON and provisioning, When regenerating in check mode, Then nothing differs
    changed = generate.build(ROOT, check=True)
    assert changed == [], f"out of date (run `mailgenius build`): {[str(p.relative_to(ROOT)) for p in changed]}"


def test_build_writes_sorted_json_then_is_idempotent(tmp_path):
    root = _copy_sources(tmp_path)
    first = generate.build(root)
    assert sorted(p.name for p in first if p.suffix == ".json") == [f"{uid}.json" for uid in UIDS]
    assert (root / "dashboards/provisioning/datasources/mailgenius.yml") in first
    assert (root / "dashboards/provisioning/dashboards/mailgenius.yml") in first
    assert generate.build(root) == []
    for uid in UIDS:
        text = (root / "dashboards/json" / f"{uid}.json").read_text()
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        assert text == (ROOT / "dashboards/json" / f"{uid}.json").read_text()


def test_check_mode_reports_edits_and_stale_files_without_writing(tmp_path):
    root = _copy_sources(tmp_path)
    generate.build(root)
    edited = root / "dashboards/json/queue-health.json"
    edited.write_text(edited.read_text().replace('"5s"', '"1m"'))
    stale = root / "dashboards/json/old-dashboard.json"
    stale.write_text("{}")
    assert generate.build(root, check=True) == [edited, stale]
    assert stale.exists() and '"1m"' in edited.read_text()
    assert generate.build(root) == [edited, stale]
    assert not stale.exists() and generate.build(root, check=True) == []


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("x = 1\n", "defines no `dashboard`"),
    ("from dashboards.helpers import build_dashboard\n"
     "dashboard = build_dashboard('queue-health', 'd', [])\n", "must equal the file name"),
])
def test_a_broken_dashboard_source_fails_with_its_file_name(tmp_path, source, message):
    root = _copy_sources(tmp_path)
    (root / "dashboards/zz-broken.dashboard.py").write_text(source)
    with pytest.raises(generate.DashboardError, match=re.escape(message)) as exc:
        generate.build(root)
    assert "zz-broken.dashboard.py" in str(exc.value)
    assert not (root / "dashboards/json").exists()  # nothing half-written


def test_a_missing_dashboard_source_is_an_error(tmp_path):
    root = _copy_sources(tmp_path)
    (root / "dashboards/email-metrics.dashboard.py").unlink()
    with pytest.raises(generate.DashboardError, match="email-metrics"):
        generate.build(root)


# -- what Grafana accepts ---------------------------------------------------------------------

def test_the_dashboards_with_the_stable_uids(dashboards):
    assert sorted(dashboards) == UIDS
    assert {d["title"] for d in dashboards.values()} == set(helpers.DASHBOARDS.values())


@pytest.mark.parametrize("uid", UIDS)
def test_dashboard_header(dashboards, uid):
    d = dashboards[uid]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["refresh"] == "5s"
    assert d["time"] == {"from": "now-24h", "to": "now"}
    assert "5s" in d["timepicker"]["refresh_intervals"]
    assert d["id"] is None  # provisioning assigns ids; a fixed one would clash
    assert helpers.TAG in d["tags"]
    assert d["panels"] and "rows" not in d


@pytest.mark.parametrize("uid", UIDS)
def test_panel_ids_unique_and_grid_positions_do_not_overlap(dashboards, uid):
    panels = list(iter_panels(dashboards[uid]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy"), p["title"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} passes column 24"
        boxes.append((p["title"], g))
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                   and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
        assert not overlap, f"{ta!r} overlaps {tb!r}"


@pytest.mark.parametrize("uid", UIDS)
def test_panels_are_builtin_types_with_defined_datasources(dashboards, provisioned_uids, provisioned_names, uid):
    d = dashboards[uid]
    for p in iter_panels(d):
        assert p["type"] in BUILTIN_PANEL_TYPES, p["type"]
        if p["type"] in ("alertlist", "alertGroups"):
            # these select their source by datasource name, not uid
            source = p["options"]["datasource" if p["type"] == "alertlist" else "alertmanager"]
            assert source in provisioned_names, f"{p['title']}: {source!r} is not a provisioned datasource"
            assert provisioned_names[source] == ("prometheus" if p["type"] == "alertlist" else "alertmanager")
        if p["type"] in ("row", "text", "alertlist", "alertGroups"):
            continue
        assert p["targets"], f"{p['title']} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(refs), p["title"]
        variables = {v["name"]: v for v in d["templating"]["list"] if v["type"] == "datasource"}
        for ds in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
            # a datasource variable of the dashboard, of the panel's type (never a fixed uid)
            name = ds["uid"].removeprefix("${").removesuffix("}")
            assert name in variables, f"{p['title']}: datasource {ds} is not a variable"
            assert variables[name]["query"] == ds["type"]
            # whose default is a datasource the compose stack provisions
            assert provisioned_names[variables[name]["current"]["value"]] == ds["type"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
    variables = {v["name"]: v for v in d["templating"]["list"] if v["type"] == "datasource"}
    for ann in d["annotations"]["list"]:
        if ann.get("expr"):
            assert ann["datasource"]["uid"] == "${datasource}"
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            name = var["datasource"]["uid"].removeprefix("${").removesuffix("}")
            assert variables[name]["query"] == var["datasource"]["type"], var["name"]


@pytest.mark.parametrize("uid", UIDS)
def test_every_variable_a_query_uses_is_defined(dashboards, uid):
    d = dashboards[uid]
    defined = {v["name"] for v in d["templating"]["list"]} | set(BUILTINS)
    for q in iter_queries(d):
        assert used_variables(q.expr) <= defined, f"{q.key}: {used_variables(q.expr) - defined}"
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            assert var["includeAll"] and var["multi"] and var["allValue"]


def test_variables_for_service_queue_provider_and_campaign(dashboards):
    names = {v["name"] for d in dashboards.values() for v in d["templating"]["list"]}
    assert {"service", "queue", "provider", "campaign"} <= names


@pytest.mark.parametrize("uid", UIDS)
def test_links_reach_every_other_dashboard(dashboards, uid):
    d = dashboards[uid]
    targets = {link["url"] for link in d["links"]}
    assert targets == {f"/d/{other}" for other in UIDS if other != uid}
    for p in iter_panels(d):
        for link in p.get("links") or []:
            m = re.match(r"/d/([\w-]+)", link["url"])
            assert m and m.group(1) in dashboards, link


def test_alert_dashboard_urls_land_on_a_dashboard(dashboards):
    rule_files = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
    if not rule_files:
        pytest.skip("the alerting generator has not rendered prometheus/rules yet")
    seen = 0
    for path in rule_files:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                url = rule.get("annotations", {}).get("dashboard_url")
                if url is None:
                    continue
                m = re.search(r"(?:/d/|[?&]dashboard=)([\w-]+)", url)
                assert m and m.group(1) in dashboards, f"{rule['alert']}: {url}"
                seen += 1
    assert seen > 0


def test_every_bullet_of_the_guide_has_a_row(dashboards):
    bullets = dict(GUIDE_BULLETS)
    if GUIDE.exists():
        # the guide itself, section by section ("#### **N. Title**" then "- **Bullet**: ...")
        text = GUIDE.read_text()
        order = list(helpers.DASHBOARDS)
        sections = re.findall(r"#### \*\*(\d)\. [^*]+\*\*\n((?:- .*\n)+)", text)
        assert len(sections) == 6
        for num, body in sections:
            bullets[order[int(num) - 1]] = re.findall(r"- \*\*([^*]+)\*\*", body)
    elif IN_CI:
        pytest.fail(f"{GUIDE} not found")
    for uid, names in bullets.items():
        rows = " ".join(p.get("description") or "" for p in dashboards[uid]["panels"] if p["type"] == "row")
        for name in names:
            assert name in rows, f"{uid}: no row implements the guide's {name!r}"


@pytest.mark.parametrize("uid", UIDS)
def test_every_row_holds_panels(dashboards, uid):
    current, counts = None, {}
    for p in dashboards[uid]["panels"]:
        if p["type"] == "row":
            current = p["title"]
            counts[current] = 0
        else:
            assert current is not None, f"{p['title']} sits above the first row"
            counts[current] += 1
    assert counts and all(counts.values()), counts


def test_capacity_planning_uses_predict_linear(dashboards):
    exprs = [q.expr for q in iter_queries(dashboards["system-health"]) if "predict_linear" in q.expr]
    for what in ("node_filesystem_avail_bytes", M.LEADS, M.QUEUE_MESSAGES):
        assert any(what in e for e in exprs), what


# -- PromQL ----------------------------------------------------------------------------------

def _offline_values(d: dict) -> dict[str, str]:
    return {v["name"]: "example" for v in d["templating"]["list"]}


def test_every_promql_target_parses_with_promtool(dashboards, tmp_path):
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing: `make test` installs the Debian prometheus package")
    groups, keys = [], []
    for uid in UIDS:
        d = dashboards[uid]
        for q in iter_queries(d):
            if q.datasource == "prometheus":
                keys.append(q.key)
                groups.append({"name": f"q{len(keys)}", "rules": [
                    {"record": "dashboards:query", "expr": substitute(q.expr, _offline_values(d))}]})
    assert len(keys) > 100
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        bad = {int(n) for n in re.findall(r'group "q(\d+)"', proc.stdout + proc.stderr)}
        pytest.fail("promtool rejects: " + "; ".join(keys[n - 1] for n in sorted(bad)) + "\n" + proc.stdout + proc.stderr)


def test_promtool_would_catch_a_broken_query(tmp_path):
    # the check above is only worth something if promtool rejects bad PromQL
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "q1", "rules": [
        {"record": "dashboards:query", "expr": "sum by (x (rate(foo[1m]))"}]}]}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


#: metric families of components we scrape but do not define
EXTERNAL_PREFIXES = ("dramatiq_", "pg_", "redis_", "node_", "alertmanager_", "prometheus_", "process_")
EXTERNAL_NAMES = {"up", "ALERTS", "time"}


def _recorded_series() -> set[str]:
    """Series the generated recording rules produce (e.g. the SLO dashboard's slo:*)."""
    return {r["record"] for path in (ROOT / "prometheus" / "rules").glob("*.yml")
            for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "record" in r}


def test_metric_names_come_from_the_catalogue_or_a_scraped_component(dashboards):
    catalogue = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str) and v.startswith(M.PREFIX)}
    # and the recorded series of the contract (alerting/rules.yml), which the alerts read too
    catalogue |= {r.series for r in contract.get().recording.values()}
    recorded = _recorded_series()
    for uid in UIDS:
        for q in iter_queries(dashboards[uid]):
            if q.datasource != "prometheus":
                continue
            for name in metric_names(q.expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                ok = (name in catalogue or base in catalogue or name in EXTERNAL_NAMES
                      or name.startswith(EXTERNAL_PREFIXES) or name in recorded)
                assert ok, f"{q.key}: {name} is neither in mailgenius.metrics, a known exporter's nor recorded"


def test_metric_name_extraction():
    expr = ('sum by (service) (rate(mailgenius_http_requests_total{status=~"5..",route!="/metrics"}[5m])) '
            '/ on (x) histogram_quantile(0.9, sum by (le) (rate(foo_bucket[1m]))) + up offset 5m')
    assert metric_names(expr) == {"mailgenius_http_requests_total", "foo_bucket", "up"}


# -- Loki / Alloy ---------------------------------------------------------------------------

def _stages(alloy) -> list:
    (process,) = alloy.find("loki.process")
    return process.blocks


def alloy_labels(alloy) -> set[str]:
    """Labels Alloy attaches to streams: its `stage.labels` and `stage.static_labels` stages (the
    file source adds only `filename`, which stage.labels never keeps: see the test below)."""
    labels: set[str] = set()
    for stage in _stages(alloy):
        if stage.name in ("stage.labels", "stage.static_labels"):
            labels.update(stage.attrs["values"])
    return labels


def test_alloy_promotes_only_service_and_level(alloy):
    assert alloy_labels(alloy) == {"service", "level"}
    (write,) = alloy.find("loki.write")
    (endpoint,) = write.find("endpoint")
    assert endpoint.attrs["url"].endswith("/loki/api/v1/push")
    # the pipeline is wired: files -> process -> write
    (source,) = alloy.find("loki.source.file")
    (process,) = alloy.find("loki.process")
    assert [r.path for r in source.attrs["forward_to"]] == [f"loki.process.{process.label}.receiver"]
    assert [r.path for r in process.attrs["forward_to"]] == [f"loki.write.{write.label}.receiver"]
    # Docker's log files, not its socket
    (match,) = alloy.find("local.file_match")
    assert match.attrs["path_targets"] == [{"__path__": "/var/lib/docker/containers/*/*-json.log"}]


def test_logql_targets_use_only_alloy_labels(dashboards, alloy):
    allowed = alloy_labels(alloy)
    loki_queries = [q for uid in UIDS for q in iter_queries(dashboards[uid]) if q.datasource == "loki"]
    assert loki_queries
    for q in loki_queries:
        used = logql_labels(q.expr)
        assert used, f"{q.key}: no stream selector"
        assert used <= allowed, f"{q.key} uses {used - allowed}, which Alloy does not produce"
        # Loki refuses selectors whose every matcher matches the empty string
        assert re.search(r'service=~"\$service"', q.expr), q.key
    service_var = next(v for v in dashboards["structured-logs"]["templating"]["list"] if v["name"] == "service")
    assert service_var["allValue"] == ".+"


LOGQL_DIR = ROOT / "tests" / "dashboards" / "logql"


def parse_logql(queries: list[str]) -> list[dict]:
    """Grafana's LogQL grammar (npm @grafana/lezer-logql, installed by `make test`'s setup)."""
    if not (LOGQL_DIR / "node_modules" / "@grafana" / "lezer-logql").is_dir() or not shutil.which("node"):
        msg = "Grafana's LogQL grammar is not installed (scripts/setup.sh --test runs npm ci)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    proc = subprocess.run(["node", str(LOGQL_DIR / "check.cjs")], input=json.dumps(queries), capture_output=True,
                          text=True, timeout=60, cwd=LOGQL_DIR)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_logql_target_parses_with_grafanas_grammar(dashboards):
    d = dashboards["structured-logs"]
    values = {"service": "(importer|sender-worker)", "level": "(error|critical)", "search": "import started"}
    queries = [substitute(q.expr, values) for q in iter_queries(d) if q.datasource == "loki"]
    assert len(queries) >= 6
    bad = [(r["query"], r["errors"]) for r in parse_logql(queries) if r["errors"]]
    assert not bad, f"LogQL syntax errors (query, offsets): {bad}"


def test_the_logql_grammar_rejects_a_broken_query():
    broken, fine = parse_logql(['sum by (level (count_over_time({service="x"}[1m]))', '{service="x"} |= "y"'])
    assert broken["errors"] and not fine["errors"]


def test_logql_label_extraction_sees_a_foreign_label():
    assert logql_labels('sum by (pod) (rate({app="x", level=~"e.*"} |= "a" [1m]))') == {"app", "level", "pod"}


def _jmes(doc: dict, expression: str):
    """The dotted-path subset of JMESPath that the json stages use (quoted segments allowed)."""
    for part in re.findall(r'"([^"]*)"|([^.]+)', expression):
        key = part[0] or part[1]
        doc = doc.get(key) if isinstance(doc, dict) else None
    return doc


def _run_json_stage(stage, line: str) -> dict:
    doc = json.loads(line)
    return {k: _jmes(doc, v or k) for k, v in stage.attrs["expressions"].items()}


def test_alloy_pipeline_reads_service_and_level_from_real_service_logs(dashboards, alloy):
    # Given the services' own JSON formatter
    from mailgenius.logs import setup_logging

    buf = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("importer-worker", "DEBUG", stream=buf)
        log = logging.getLogger("importer.actors")
        log.debug("d")
        log.info("import started", extra={"import_id": 42})
        log.warning("w")
        log.error("row rejected")
        log.critical("c")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    # wrapped as Docker's json-file driver writes them (compose asks for the service label)
    lines = [json.dumps({"log": line + "\n", "stream": "stderr", "time": "2026-12-05T12:00:00.123456789Z",
                         "attrs": {"com.docker.compose.service": "importer-worker"}})
             for line in buf.getvalue().splitlines()]
    envelope, app = [s for s in _stages(alloy) if s.name == "stage.json"]
    # When the first json stage opens the envelope and the output stage puts the line back
    opened = [_run_json_stage(envelope, line) for line in lines]
    assert {o["compose_service"] for o in opened} == {"importer-worker"}
    output = next(s for s in _stages(alloy) if s.name == "stage.output")
    inner = [o[output.attrs["source"]].rstrip("\n") for o in opened]
    # and the second extracts its expressions from each line
    extracted = [_run_json_stage(app, line) for line in inner]
    # Then every line yields the service and a level the dashboard's level filter offers
    levels = next(v for v in dashboards["structured-logs"]["templating"]["list"] if v["name"] == "level")
    offered = {o["value"] for o in levels["options"]}
    assert [e["service"] for e in extracted] == ["importer-worker"] * 5
    assert [e["level"] for e in extracted] == ["debug", "info", "warning", "error", "critical"]
    assert {e["level"] for e in extracted} <= offered
    # and the text-line regex agrees for dramatiq's own "[INFO]" lines
    regex = next(s for s in _stages(alloy) if s.name == "stage.regex")
    pattern = re.compile(regex.attrs["expression"])
    m = pattern.search("[2026-11-29 17:00:00,000] [PID 7] [MainThread] [dramatiq.MainProcess] [WARNING] x")
    assert m and m.group("level").lower() in offered
    # lines of containers outside the compose project are dropped
    template = next(s for s in _stages(alloy) if s.name == "stage.template" and s.attrs["source"] == "ours")
    drop = next(s for s in _stages(alloy) if s.name == "stage.drop")
    assert drop.attrs == {"source": "ours", "value": "no"}
    assert "if .compose_service" in template.attrs["template"]



def test_loki_config_keeps_a_day_of_logs_on_disk():
    cfg = yaml.safe_load((ROOT / "dashboards/logging/loki.yml").read_text())
    assert cfg["server"]["http_listen_port"] == 3100
    assert cfg["auth_enabled"] is False
    hours = int(cfg["limits_config"]["retention_period"].removesuffix("h"))
    assert hours >= 24


# -- provisioning ----------------------------------------------------------------------------

def test_provisioning_defines_the_three_datasources_and_a_provider(provisioned_uids):
    assert provisioned_uids == {"prometheus": "prometheus", "loki": "loki", "alertmanager": "alertmanager"}
    prov = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards/mailgenius.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == generate.GRAFANA_DASHBOARDS_PATH
    ds = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/mailgenius.yml").read_text())
    urls = {d["uid"]: d["url"] for d in ds["datasources"]}
    assert urls == generate.COMPOSE_URLS
    assert [d["uid"] for d in ds["datasources"] if d.get("isDefault")] == ["prometheus"]


def test_docker_compose_mounts_what_grafana_provisioning_expects():
    compose = ROOT / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("docker-compose.yml is not written yet")
    services = yaml.safe_load(compose.read_text())["services"]
    grafana = " ".join(str(v) for v in services["grafana"].get("volumes", []))
    assert "dashboards/provisioning" in grafana
    assert "dashboards/json" in grafana and generate.GRAFANA_DASHBOARDS_PATH in grafana
    alloy = " ".join(str(v) for v in services["alloy"].get("volumes", []))
    assert "dashboards/logging/config.alloy" in alloy


# -- command line ----------------------------------------------------------------------------

MAILGENIUS = str(Path(__import__("sys").executable).parent / "mailgenius")


def test_cli_build_check_passes_on_the_committed_tree():
    proc = subprocess.run([MAILGENIUS, "build", "--check", "--root", str(ROOT)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def test_cli_lists_every_query(dashboards):
    proc = subprocess.run([MAILGENIUS, "dashboards", "list", "--root", str(ROOT)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == sum(len(list(iter_queries(d))) for d in dashboards.values())
    assert all(len(line.split("\t")) == 5 for line in lines)


def test_cli_check_against_an_unreachable_prometheus_is_one_clear_line():
    from tests.conftest import free_port

    proc = subprocess.run([MAILGENIUS, "dashboards", "check", "--root", str(ROOT),
                           "--prometheus-url", f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot query Prometheus" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_check_without_generated_json_says_so(tmp_path):
    proc = subprocess.run([MAILGENIUS, "dashboards", "check", "--root", str(tmp_path),
                           "--prometheus-url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "mailgenius build" in proc.stderr
