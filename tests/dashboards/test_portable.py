"""The dashboards work in anyone's Grafana: a datasource variable instead of a fixed uid, the
mixin-style config, and JSON in today's shape (no keys Grafana would migrate away)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dashboards import generate, helpers
from dashboards.queries import iter_panels, iter_queries, load_json

ROOT = Path(__file__).resolve().parents[2]
UIDS = sorted(helpers.DASHBOARDS)


@pytest.fixture(scope="module")
def dashboards() -> dict:
    return load_json(ROOT)


def _all_refs(obj):
    if isinstance(obj, dict):
        if "datasource" in obj and isinstance(obj["datasource"], dict):
            yield obj["datasource"]
        for v in obj.values():
            yield from _all_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_refs(v)


@pytest.mark.parametrize("uid", UIDS)
def test_no_hard_coded_datasource_uid(dashboards, uid):
    d = dashboards[uid]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for ref in _all_refs(d):
        if ref.get("type") in ("prometheus", "loki"):
            assert ref["uid"].startswith("${"), f"{uid}: fixed datasource uid {ref}"
            assert ref["uid"][2:-1] in variables
    # a dashboard with Loki panels has its own Loki variable
    if any(q.datasource == "loki" for q in iter_queries(d)):
        assert variables["loki_datasource"]["query"] == "loki"


@pytest.mark.parametrize("uid", UIDS)
def test_json_has_no_pre_grafana_7_keys(dashboards, uid):
    d = dashboards[uid]
    assert d["schemaVersion"] >= helpers.SCHEMA_VERSION
    assert not set(d) & generate.LEGACY_DASHBOARD_KEYS
    assert "time_options" not in d["timepicker"]
    for p in iter_panels(d):
        assert not set(p) & generate.LEGACY_PANEL_KEYS, (p["title"], set(p) & generate.LEGACY_PANEL_KEYS)
        assert None not in p.values(), p["title"]
        for t in p.get("targets", []):
            assert not set(t) & generate.LEGACY_TARGET_KEYS, (p["title"], set(t) & generate.LEGACY_TARGET_KEYS)
    for v in d["templating"]["list"]:
        assert not set(v) & generate.LEGACY_VARIABLE_KEYS, v["name"]


def test_config_file_changes_the_defaults_and_rejects_unknown_keys(tmp_path, monkeypatch):
    cfg = tmp_path / "dashboards.yml"
    cfg.write_text("datasource: Mimir\nloki_datasource: Logs\ndatasource_regex: /prod-.*/\n"
                   "alertmanager_datasource: AM\n")
    monkeypatch.setenv("MAILGENIUS_DASHBOARDS_CONFIG", str(cfg))
    try:
        rendered = {p.stem: json.loads(t) for p, t in generate.render_dashboards(ROOT).items()}
    finally:
        helpers.configure({})
    logs = {v["name"]: v for v in rendered["structured-logs"]["templating"]["list"]}
    assert logs["datasource"]["current"]["value"] == "Mimir"
    assert logs["loki_datasource"]["current"]["value"] == "Logs"
    assert logs["datasource"]["regex"] == "/prod-.*/"
    groups = [p for p in iter_panels(rendered["alerts-incidents"]) if p["type"] == "alertGroups"]
    assert groups and all(p["options"]["alertmanager"] == "AM" for p in groups)
    cfg.write_text("datasourse: typo\n")
    with pytest.raises(ValueError, match="datasourse"):
        helpers.configure()
    monkeypatch.delenv("MAILGENIUS_DASHBOARDS_CONFIG")
    # the committed files are the defaults
    assert {p.stem: json.loads(t) for p, t in generate.render_dashboards(ROOT).items()} == load_json(ROOT)
