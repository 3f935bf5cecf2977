"""The Alertmanager webhook (``POST /api/alerts/webhook``) is Alertmanager's alone: it needs the
bearer token ``make run`` generates (refused when none is configured), unknown severities are
``other``, and a replayed fingerprint cannot resolve an incident without the token."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest
import yaml

from console import stack
from exporter.app import create_app
from exporter.collectors import incident_stats
from mailgenius import secretfiles
from mailgenius.settings import SettingsError, load_settings
from tests.conftest import bearer

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "security-suite-webhook-token-" + "0123456789abcdef"


def payload(status: str, severity: str = "critical", fp: str | None = None, name: str = "QueueDepthHigh",
            starts: str = "2026-11-29T10:00:00Z", ends: str = "0001-01-01T00:00:00Z") -> dict:
    return {"version": "4", "status": status, "receiver": "incidents", "alerts": [{
        "status": status, "labels": {"alertname": name, "severity": severity, "service": "sender"},
        "annotations": {"summary": "s"}, "startsAt": starts, "endsAt": ends,
        "fingerprint": fp or secrets.token_hex(8)}]}


@pytest.fixture
async def exporter_for(aiohttp_client, settings, pool):
    async def make(token: str | None):
        exporter = settings.exporter.replace(webhook_token=token or "")
        return await aiohttp_client(create_app(settings.replace(exporter=exporter)))
    return make


async def _count(pool, fp: str, status: str | None = None) -> int:
    return await pool.fetchval("SELECT count(*) FROM incidents WHERE fingerprint = $1 AND ($2::text IS NULL OR status = $2)",
                               fp, status)


async def test_webhook_is_refused_when_no_token_is_configured(exporter_for, pool, monkeypatch):
    # Given an exporter with no webhook token configured (the default before `make run`)
    monkeypatch.delenv("MAILGENIUS_ALERT_WEBHOOK_TOKEN", raising=False)
    client = await exporter_for(None)
    fp = secrets.token_hex(8)
    # When a forged firing alert arrives, with or without some Authorization
    for headers in ({}, bearer("anything-at-all-anything-at-all")):
        resp = await client.post("/api/alerts/webhook", json=payload("firing", fp=fp), headers=headers)
        # Then it is refused in the JSON error shape, and no incident exists
        assert resp.status == 403, await resp.text()
        assert (await resp.json())["error"]["code"] == "webhook_disabled"
    assert await _count(pool, fp) == 0


async def test_webhook_needs_the_bearer_token(exporter_for, pool, make_key):
    client = await exporter_for(TOKEN)
    fp = secrets.token_hex(8)
    read_key = await make_key("read")
    for headers in ({}, bearer("wrong-token-wrong-token-wrong"), bearer(read_key), {"Authorization": TOKEN}):
        resp = await client.post("/api/alerts/webhook", json=payload("firing", fp=fp), headers=headers)
        assert resp.status == 401, (headers, await resp.text())
        assert resp.content_type == "application/json"
    assert await _count(pool, fp) == 0
    resp = await client.post("/api/alerts/webhook", json=payload("firing", fp=fp), headers=bearer(TOKEN))
    assert resp.status == 200, await resp.text()
    assert await _count(pool, fp, "open") == 1


async def test_replayed_fingerprint_cannot_resolve_without_the_token(exporter_for, pool, make_key):
    # Given a real incident opened by Alertmanager (with the token)
    client = await exporter_for(TOKEN)
    fp = secrets.token_hex(8)
    assert (await client.post("/api/alerts/webhook", json=payload("firing", fp=fp), headers=bearer(TOKEN))).status == 200
    # When someone replays its fingerprint as resolved, with an API key or nothing
    resolved = payload("resolved", fp=fp, ends="2026-11-29T10:05:00Z")
    for headers in ({}, bearer(await make_key("read", "admin"))):
        resp = await client.post("/api/alerts/webhook", json=resolved, headers=headers)
        assert resp.status == 401, await resp.text()
    # Then the incident is still open
    assert await _count(pool, fp, "open") == 1


async def test_unknown_severities_are_other(exporter_for, pool):
    client = await exporter_for(TOKEN)
    fps = [secrets.token_hex(8) for _ in range(3)]
    for fp, severity in zip(fps, ["x" * 150, "Sev-" + secrets.token_hex(4), "CRITICAL"], strict=True):
        resp = await client.post("/api/alerts/webhook", json=payload("firing", severity=severity, fp=fp),
                                 headers=bearer(TOKEN))
        assert resp.status == 200, await resp.text()
    rows = dict(await pool.fetch("SELECT fingerprint, severity FROM incidents WHERE fingerprint = ANY($1)", fps))
    assert [rows[fp] for fp in fps] == ["other", "other", "critical"]
    stats = await incident_stats(pool, 30.0)
    assert set(stats.open_by_severity) <= {"critical", "warning", "info", "none", "other"}


def test_a_short_webhook_token_is_refused_naming_the_variable(settings):
    with pytest.raises(SettingsError) as exc:
        load_settings({"MAILGENIUS_ALERT_WEBHOOK_TOKEN": "s3cret"})
    assert exc.value.variable == "MAILGENIUS_ALERT_WEBHOOK_TOKEN"


def test_generated_token_file_is_0600_from_creation_and_wired_into_alertmanager(tmp_path, monkeypatch):
    # Given a permissive umask, and chmod watched: a secret file must never need one
    chmodded = []
    real_chmod = os.chmod
    monkeypatch.setattr(os, "chmod", lambda p, mode, *a, **k: (chmodded.append(str(p)), real_chmod(p, mode, *a, **k)))
    monkeypatch.setattr(Path, "chmod", lambda self, mode, *a, **k: (chmodded.append(str(self)), real_chmod(self, mode)))
    old = os.umask(0o022)
    try:
        # When stack-prepare's helpers create the token and the Svix secret under a fresh data dir
        token = secretfiles.alert_webhook_token(tmp_path / "secrets")
        env = stack.stack_env({"MAILGENIUS_DATA_DIR": str(tmp_path / "data")})
    finally:
        os.umask(old)
    token_file = tmp_path / "secrets" / "alert_webhook_token"
    svix_file = tmp_path / "data" / "run" / "resend-webhook-secret"
    # Then both are mode 0600, written without a chmod after the fact, and the token is long
    for f in (token_file, svix_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert not [p for p in chmodded if Path(p).name == f.name], chmodded
    assert len(token) >= 32 and token_file.read_text().strip() == token
    assert secretfiles.alert_webhook_token(tmp_path / "secrets") == token  # kept across starts
    assert env["MAILGENIUS_RESEND_WEBHOOK_SECRET"].startswith("whsec_")
    # And the rendered Alertmanager config sends it to the incident webhook (and the Watchdog's)
    paths = stack.render_configs({**env, "MAILGENIUS_EXPORTER_PORT": "19300"}, ROOT, tmp_path / "run")
    am = yaml.safe_load(Path(paths["alertmanager"]).read_text())
    hooks = [w for r in am["receivers"] for w in r.get("webhook_configs", []) if w["url"].endswith("/api/alerts/webhook")]
    assert hooks
    for hook in hooks:
        auth = hook["http_config"]["authorization"]
        assert auth["type"] == "Bearer"
        assert auth["credentials_file"] == str((ROOT / "var" / "secrets" / "alert_webhook_token").resolve())


def test_every_committed_alertmanager_config_authenticates_to_the_incident_webhook():
    for name in ("alertmanager.yml", "alertmanager.compose.yml"):
        am = yaml.safe_load((ROOT / "alertmanager" / name).read_text())
        hooks = [w for r in am["receivers"] for w in r.get("webhook_configs", [])
                 if w["url"].endswith("/api/alerts/webhook")]
        assert hooks, name
        assert all(h.get("http_config", {}).get("authorization", {}).get("credentials_file", "")
                   .endswith("/alert_webhook_token") for h in hooks), name
