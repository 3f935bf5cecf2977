"""deploy/systemd: one unit per process of the Procfile that is ours (not the dev SMTP sink, not
the Debian-packaged Prometheus/Alertmanager/exporters, which ship their own units), each with
Restart=, ordering after Postgres/Redis and the migrations, the same EnvironmentFile; checked by
`systemd-analyze verify` (which needs no running systemd). scripts/setup.sh --test installs the
`systemd` Debian package when the binary is missing, so CI always runs this."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
#: Procfile processes that get a unit
OURS = ("sender", "importer", "exporter", "sender-worker", "importer-worker", "scheduler")
ENV_FILE = "/etc/mailgenius/mailgenius.env"


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI: scripts/setup.sh --test installs the systemd package")
        pytest.skip("systemd-analyze not installed (Debian package systemd; scripts/setup.sh --test installs it)")
    return path


def _parse(path: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False)
    cp.optionxform = str
    cp.read(path)
    return cp


def _installed_copy(tmp_path: Path) -> Path:
    """The units as installed from this checkout: /opt/mailgenius -> the repository."""
    out = tmp_path / "units"
    out.mkdir()
    env = tmp_path / "mailgenius.env"
    shutil.copy(UNITS / "mailgenius.env.example", env)
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.target")]:
        text = unit.read_text().replace("/opt/mailgenius", str(ROOT)).replace(ENV_FILE, str(env))
        (out / unit.name).write_text(text)
    return out


def _verify(analyze: str, directory: Path) -> subprocess.CompletedProcess:
    units = sorted(p.name for p in directory.iterdir())
    return subprocess.run([analyze, "verify", "--man=no", *units], cwd=directory, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"})


def test_one_unit_per_process_restarts_and_shares_the_environment_file():
    procfile = {line.split(":", 1)[0] for line in (ROOT / "Procfile").read_text().splitlines()
                if line and not line.startswith("#")}
    assert set(OURS) <= procfile
    target = _parse(UNITS / "mailgenius.target")
    wants = set(target["Unit"]["Wants"].split())
    for name in OURS:
        cp = _parse(UNITS / f"mailgenius-{name}.service")
        svc, unit = cp["Service"], cp["Unit"]
        assert svc["Restart"] in ("always", "on-failure"), name
        assert svc["EnvironmentFile"] == ENV_FILE, name
        assert "postgresql.service" in unit["After"] and "redis-server.service" in unit["After"], name
        assert "mailgenius-migrate.service" in unit["Requires"], name
        assert svc["ExecStart"].startswith("/opt/mailgenius/.venv/bin/mailgenius "), name
        assert f"mailgenius-{name}.service" in wants
    for name in ("sender-worker", "importer-worker"):  # one SIGTERM, to dramatiq's main process
        assert _parse(UNITS / f"mailgenius-{name}.service")["Service"]["KillMode"] == "mixed"


def test_systemd_analyze_verify_accepts_every_unit(tmp_path):
    analyze = _analyze()
    directory = _installed_copy(tmp_path)
    res = _verify(analyze, directory)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr + res.stdout


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    # the check can fail: a misspelt key and a missing binary are reported
    analyze = _analyze()
    directory = _installed_copy(tmp_path)
    unit = directory / "mailgenius-sender.service"
    unit.write_text(unit.read_text().replace("Restart=always", "Restrat=always")
                    .replace(".venv/bin/mailgenius serve", ".venv/bin/no-such-binary serve"))
    res = _verify(analyze, directory)
    assert "Unknown key 'Restrat'" in res.stderr
    assert "no-such-binary is not executable" in res.stderr and res.returncode != 0
