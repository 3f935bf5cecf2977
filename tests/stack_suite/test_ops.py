"""The operator commands on their own: stack variables and config rendering (checked with the
real promtool and amtool), port conflicts, `status` against a dead stack, and the maintenance
commands against the real test database."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import yaml

from console import stack
from mailgenius.settings import SettingsError
from tests.conftest import cli_env as settings_env
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
MAILGENIUS = str(Path(sys.executable).parent / "mailgenius")


def moved_ports() -> dict[str, str]:
    """A distinct free port per component (free_port() closes its socket, so two calls can get
    the same port back: the taken-port test then saw two components on one port, 1 run in 11)."""
    ports: set[int] = set()
    while len(ports) < len(stack.COMPONENTS):
        ports.add(free_port())
    return {c.env: str(p) for c, p in zip(stack.COMPONENTS, sorted(ports), strict=True)}


def cli_env(settings, tmp_path, **extra) -> dict[str, str]:
    """The test settings' child environment (tests/conftest.py), with a data dir of its own."""
    return settings_env(settings, **{"MAILGENIUS_DATA_DIR": str(tmp_path / "var"), **extra})


def run_cli(*args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([MAILGENIUS, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- stack variables ----------------------------------------------------------------------------

def test_stack_env_defaults_are_the_documented_ports(tmp_path):
    env = stack.stack_env({"MAILGENIUS_DATA_DIR": str(tmp_path)})
    assert env["MAILGENIUS_SENDER_URL"] == "http://127.0.0.1:8001"
    assert env["MAILGENIUS_PROMETHEUS_URL"] == "http://127.0.0.1:9090"
    assert env["MAILGENIUS_SMTP_PORT"] == "1025"
    assert env["MAILGENIUS_POSTGRES_EXPORTER_DSN"].endswith("?sslmode=disable")
    assert {c.env: int(env[c.env]) for c in stack.COMPONENTS} == {c.env: c.default for c in stack.COMPONENTS}
    # the webhook secret is generated once and then kept
    secret = env["MAILGENIUS_RESEND_WEBHOOK_SECRET"]
    assert secret.startswith("whsec_")
    assert stack.stack_env({"MAILGENIUS_DATA_DIR": str(tmp_path)})["MAILGENIUS_RESEND_WEBHOOK_SECRET"] == secret


def test_moved_ports_move_every_url(tmp_path):
    ports = moved_ports()
    env = stack.stack_env({**ports, "MAILGENIUS_DATA_DIR": str(tmp_path)})
    assert env["MAILGENIUS_SENDER_URL"] == f"http://127.0.0.1:{ports['MAILGENIUS_SENDER_PORT']}"
    assert env["MAILGENIUS_PUBLIC_URL"] == env["MAILGENIUS_SENDER_URL"]
    assert env["MAILGENIUS_ALERTMANAGER_URL"] == f"http://127.0.0.1:{ports['MAILGENIUS_ALERTMANAGER_PORT']}"
    assert env["MAILGENIUS_SMTP_PORT"] == ports["MAILGENIUS_SINK_PORT"]
    # the Prometheus port follows MAILGENIUS_PROMETHEUS_URL when only the URL is given
    env = stack.stack_env({"MAILGENIUS_PROMETHEUS_URL": "http://127.0.0.1:19090", "MAILGENIUS_DATA_DIR": str(tmp_path)})
    assert env["MAILGENIUS_PROMETHEUS_PORT"] == "19090"


def test_bad_and_clashing_ports_are_refused_by_name(tmp_path):
    with pytest.raises(SettingsError, match="MAILGENIUS_NODE_EXPORTER_PORT"):
        stack.stack_env({"MAILGENIUS_NODE_EXPORTER_PORT": "ninety", "MAILGENIUS_DATA_DIR": str(tmp_path)})
    with pytest.raises(stack.OpsError, match="prometheus and sender|sender and prometheus"):
        stack.stack_env({"MAILGENIUS_PROMETHEUS_PORT": "8001", "MAILGENIUS_DATA_DIR": str(tmp_path)})


def test_rendered_configs_move_every_port_and_pass_promtool_and_amtool(tmp_path):
    ports = moved_ports()
    env = stack.stack_env({**ports, "MAILGENIUS_DATA_DIR": str(tmp_path), "MAILGENIUS_SCRAPE_INTERVAL": "2s"})
    paths = stack.render_configs(env, ROOT, tmp_path / "run")
    prom = yaml.safe_load(paths["prometheus"].read_text())
    assert prom["global"]["scrape_interval"] == "2s"
    targets = {job["job_name"]: t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    for comp in stack.COMPONENTS:
        if comp.job:
            assert targets[comp.job] == f"127.0.0.1:{ports[comp.env]}", comp.job
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        f"127.0.0.1:{ports['MAILGENIUS_ALERTMANAGER_PORT']}"]
    for pattern in prom.get("rule_files", []):
        assert os.path.isabs(pattern) and list(Path(pattern).parent.glob(Path(pattern).name))
    out = subprocess.run(["promtool", "check", "config", str(paths["prometheus"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    am_text = paths["alertmanager"].read_text()
    assert f"127.0.0.1:{ports['MAILGENIUS_EXPORTER_PORT']}" in am_text
    assert "127.0.0.1:9300" not in am_text and "127.0.0.1:1025" not in am_text
    out = subprocess.run(["amtool", "check-config", str(paths["alertmanager"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_configured_grafana_and_dead_mans_switch_reach_the_rendered_stack(tmp_path):
    # Given make run's environment with a Grafana URL and an external Watchdog receiver
    ports = moved_ports()
    env = stack.stack_env({**ports, "MAILGENIUS_DATA_DIR": str(tmp_path),
                           "MAILGENIUS_GRAFANA_URL": "https://grafana.example.org",
                           "MAILGENIUS_WATCHDOG_URL": "https://deadman.example.org/ping/abc"})
    # When stack-prepare renders the configs
    paths = stack.render_configs(env, ROOT, tmp_path / "run")
    # Then the alerts Prometheus loads link to that Grafana, not to the built-in page
    prom = yaml.safe_load(paths["prometheus"].read_text())
    rules = [p for pattern in prom["rule_files"] for p in Path(pattern).parent.glob(Path(pattern).name)]
    annotations = [r["annotations"] for f in rules for g in yaml.safe_load(f.read_text())["groups"]
                   for r in g["rules"] if "alert" in r]
    assert annotations and all(a["dashboard_url"].startswith("https://grafana.example.org/d/") for a in annotations)
    # and the Watchdog goes to the dead man's switch, the ports still moved, both configs valid
    am = yaml.safe_load(paths["alertmanager"].read_text())
    watchdog = next(r for r in am["receivers"] if r["name"] == "watchdog")
    assert watchdog["webhook_configs"][0]["url"] == "https://deadman.example.org/ping/abc"
    assert f"127.0.0.1:{ports['MAILGENIUS_EXPORTER_PORT']}" in paths["alertmanager"].read_text()
    for tool, kind, path in (("promtool", "check", paths["prometheus"]), ("amtool", "check-config", paths["alertmanager"])):
        args = [tool, kind, "config", str(path)] if tool == "promtool" else [tool, kind, str(path)]
        out = subprocess.run(args, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    # Without them, the committed files are used as they are
    plain = stack.render_configs(stack.stack_env({**ports, "MAILGENIUS_DATA_DIR": str(tmp_path)}), ROOT, tmp_path / "run2")
    assert str(ROOT / "prometheus" / "rules") in plain["prometheus"].read_text()


def test_substitution_is_one_pass_so_swapped_ports_never_chain(tmp_path):
    # sender moved onto importer's default and importer onto sender's
    pm = {8001: 8002, 8002: 8001}
    got = stack._substitute({"t": ["127.0.0.1:8001", "localhost:8002", "127.0.0.1:18001"]}, pm, tmp_path, tmp_path)
    assert got == {"t": ["127.0.0.1:8002", "localhost:8001", "127.0.0.1:18001"]}


def test_stack_prepare_reports_a_taken_port_by_name(settings, tmp_path):
    ports = moved_ports()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(ports["MAILGENIUS_ALERTMANAGER_PORT"])))
        busy.listen()
        res = run_cli("stack-prepare", "--root", str(ROOT), env=cli_env(settings, tmp_path, **ports))
    assert res.returncode == 3
    assert f"port {ports['MAILGENIUS_ALERTMANAGER_PORT']} for alertmanager" in res.stderr
    assert "MAILGENIUS_ALERTMANAGER_PORT" in res.stderr
    assert not (tmp_path / "var" / "run" / "stack.env").exists()


def test_stack_prepare_writes_stack_env_that_other_commands_read(settings, tmp_path):
    ports = moved_ports()
    res = run_cli("stack-prepare", "--root", str(ROOT), env=cli_env(settings, tmp_path, **ports))
    assert res.returncode == 0, res.stderr
    assert f"http://127.0.0.1:{ports['MAILGENIUS_SENDER_PORT']}/api/health" in res.stdout
    saved = stack.read_env_file(tmp_path / "var" / "run" / "stack.env")
    assert saved["MAILGENIUS_SENDER_PORT"] == ports["MAILGENIUS_SENDER_PORT"]
    assert saved["DATABASE_URL"] == settings.database_url
    # a second terminal with only the data dir set finds the same stack
    env = stack.effective_environ({"MAILGENIUS_DATA_DIR": str(tmp_path / "var")})
    assert env["MAILGENIUS_SENDER_URL"] == f"http://127.0.0.1:{ports['MAILGENIUS_SENDER_PORT']}"


# -- status against a stack that is not running ---------------------------------------------

def test_status_exits_nonzero_and_names_what_is_down(settings, tmp_path):
    ports = moved_ports()  # nothing listens on any of them
    env = cli_env(settings, tmp_path, **ports)
    res = run_cli("status", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    for name in ("sender", "importer", "exporter", "prometheus", "alertmanager", "node-exporter", "smtp-sink"):
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(name + " "))
        assert "unhealthy" in line, line
    # the stores themselves are up
    for name in ("postgres", "redis"):
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(name + " "))
        assert "healthy" in line and "unhealthy" not in line, line
    assert "ACTIVE ALERTS: unknown" in res.stdout
    assert "OVERALL: unhealthy" in res.stdout
    res = run_cli("status", "--json", env=env)
    data = json.loads(res.stdout)
    assert data["status"] == "unhealthy" and {q["queue"] for q in data["queues"]} == {"email-sending", "lead-import"}


def test_check_one_dependency_and_unknown_names(settings, tmp_path):
    env = cli_env(settings, tmp_path, **moved_ports())
    res = run_cli("check", "database", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("postgres: healthy") and "connections" in res.stdout
    res = run_cli("check", "prometheus", env=env)
    assert res.returncode == 1 and "unhealthy" in res.stdout
    res = run_cli("check", "frobnicator", env=env)
    assert res.returncode == 2 and "unknown service 'frobnicator'" in res.stderr


def test_report_says_clearly_when_prometheus_is_unreachable(settings, tmp_path):
    env = cli_env(settings, tmp_path, MAILGENIUS_PROMETHEUS_URL=f"http://127.0.0.1:{free_port()}")
    res = run_cli("report", "daily", "--out", str(tmp_path / "r.html"), env=env)
    assert res.returncode == 1
    assert "Prometheus at" in res.stderr and "unreachable" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "r.html").exists()


# -- maintenance ------------------------------------------------------------------------------

async def test_backup_writes_a_dump_that_restores(settings, tmp_path, pool):
    # Given a lead in the database
    await pool.execute("INSERT INTO leads (email) VALUES ('backup.check@example.com')")
    env = cli_env(settings, tmp_path)
    # When backing up twice with --keep 1
    out = tmp_path / "b"
    res = run_cli("backup", "--dir", str(out), "--keep", "1", env=env)
    assert res.returncode == 0, res.stderr
    time.sleep(1.1)
    res = run_cli("backup", "--dir", str(out), "--keep", "1", env=env)
    assert res.returncode == 0, res.stderr
    backups = list(out.glob("mailgenius-*.tar"))
    # Then one backup is kept, and it restores into an empty database with the row in it
    assert len(backups) == 1 and "removed old" in res.stdout
    name = f"mgrestore_{os.getpid()}"
    target = settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        r = run_cli("restore", str(backups[0]), "--database-url", target, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        conn = await asyncpg.connect(target)
        try:
            assert await conn.fetchval("SELECT count(*) FROM leads WHERE email = 'backup.check@example.com'") == 1
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_cleanup_uploads_keeps_new_files_and_those_of_running_imports(settings, tmp_path, pool):
    up = Path(settings.upload_dir)
    up.mkdir(parents=True)
    old, fresh, needed = up / "old.csv", up / "fresh.csv", up / "running.csv"
    for p in (old, fresh, needed):
        p.write_text("email\na@example.com\n")
    two_days_ago = time.time() - 2 * 86400
    for p in (old, needed):
        os.utime(p, (two_days_ago, two_days_ago))
    await pool.execute("INSERT INTO imports (filename, path, status) VALUES ('running.csv', $1, 'running')", str(needed))
    env = cli_env(settings, tmp_path)
    res = run_cli("cleanup-uploads", "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    assert old.exists() and f"would remove {old}" in res.stdout and "1 kept" in res.stdout
    res = run_cli("cleanup-uploads", env=env)
    assert res.returncode == 0, res.stderr
    assert not old.exists() and fresh.exists() and needed.exists()
    assert "1 file(s) older than 24 h removed" in res.stdout


async def test_cleanup_uploads_keeps_the_utf8_transcoding_of_a_running_import(settings, tmp_path, pool):
    # the importer writes <upload>.utf8 for a file it transcodes and reads that while the import
    # runs; its HTTP cleanup keeps it, and so must this command
    up = Path(settings.upload_dir)
    up.mkdir(parents=True)
    needed = up / "latin1.csv"
    transcoded, orphan = up / "latin1.csv.utf8", up / "done.csv.utf8"
    for p in (needed, transcoded, orphan):
        p.write_text("email\na@example.com\n")
        two_days_ago = time.time() - 2 * 86400
        os.utime(p, (two_days_ago, two_days_ago))
    await pool.execute("INSERT INTO imports (filename, path, status) VALUES ('latin1.csv', $1, 'running')", str(needed))
    res = run_cli("cleanup-uploads", env=cli_env(settings, tmp_path))
    assert res.returncode == 0, res.stderr
    assert needed.exists() and transcoded.exists() and not orphan.exists()
    assert "1 file(s) older than 24 h removed" in res.stdout and "2 kept" in res.stdout


async def test_cleanup_uploads_keeps_the_utf8_transcoding_of_a_queued_import(settings, tmp_path, pool):
    # not started yet: the worker will read <upload>.utf8 when it claims the import, so the
    # command (the importer's cleanup_uploads) keeps it as it keeps the upload
    up = Path(settings.upload_dir)
    up.mkdir(parents=True)
    needed, transcoded = up / "queued.csv", up / "queued.csv.utf8"
    finished, finished_utf8 = up / "done.csv", up / "done.csv.utf8"
    two_days_ago = time.time() - 2 * 86400
    for p in (needed, transcoded, finished, finished_utf8):
        p.write_text("email\na@example.com\n")
        os.utime(p, (two_days_ago, two_days_ago))
    await pool.execute("INSERT INTO imports (filename, path, status) VALUES ('queued.csv', $1, 'queued'), "
                       "('done.csv', $2, 'completed')", str(needed), str(finished))
    env = cli_env(settings, tmp_path)
    res = run_cli("cleanup-uploads", "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:2] == [f"would remove {finished}", f"would remove {finished_utf8}"]
    assert "2 file(s) older than 24 h to remove" in res.stdout and "2 kept" in res.stdout
    res = run_cli("cleanup-uploads", env=env)
    assert res.returncode == 0, res.stderr
    assert needed.exists() and transcoded.exists() and not finished.exists() and not finished_utf8.exists()
    assert "2 file(s) older than 24 h removed" in res.stdout and "2 kept" in res.stdout


async def test_db_maintenance_vacuums_every_table(settings, tmp_path, pool):
    env = cli_env(settings, tmp_path)
    res = run_cli("db-maintenance", env=env)
    assert res.returncode == 0, res.stderr
    tables = {r["relname"] for r in await pool.fetch("SELECT relname FROM pg_stat_user_tables WHERE schemaname='public'")}
    listed = {ln.split()[0] for ln in res.stdout.splitlines()[2:-1]}
    assert listed == tables
    assert await pool.fetchval("SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'leads'")
    res = run_cli("db-maintenance", "--table", "no_such_table", env=env)
    assert res.returncode == 2 and "no such table(s): no_such_table" in res.stderr


async def test_slow_queries_lists_statements_or_says_how_to_enable(settings, tmp_path, pool):
    preload = await pool.fetchval("SELECT current_setting('shared_preload_libraries')")
    res = run_cli("slow-queries", "--limit", "5", env=cli_env(settings, tmp_path))
    if "pg_stat_statements" in preload:
        assert res.returncode == 0, res.stderr
        assert "TOTAL MS" in res.stdout or "no statement" in res.stdout
    else:
        # this server runs without the library: a clear message and the way to enable it
        assert res.returncode == 2
        assert "pg_stat_statements is not available" in res.stderr
        assert "shared_preload_libraries" in res.stderr and "Traceback" not in res.stderr


def test_check_broker_rabbitmq_up_and_down(settings, tmp_path):
    # a RabbitMQ broker is probed on its AMQP port (workers on many hosts use it)
    down = run_cli("check", "broker", env=cli_env(settings, tmp_path, BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    assert down.returncode == 1 and "unhealthy" in down.stdout and "RabbitMQ at 127.0.0.1" in down.stdout
    rabbit = os.environ.get("MAILGENIUS_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
    if not rabbit.startswith("amqp"):
        return
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    up = run_cli("check", "broker", env=cli_env(settings, tmp_path, BROKER_URL=rabbit))
    assert up.returncode == 0 and "accepts connections" in up.stdout, up.stdout + up.stderr
