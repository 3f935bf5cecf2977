"""`make run` from a fresh clone, in the background, on free ports: every health endpoint
healthy and every Prometheus target up within 60 s; `mailgenius demo` then `mailgenius status`
exits 0; `mailgenius report daily` writes a report whose charts are non-empty; Ctrl-C stops all.

The clone gets a virtualenv that reuses this one's installed dependencies (a .pth file) instead
of downloading them again: a full `pip install` would take most of this suite's 3-minute budget.
Everything else is the real thing: `make run` runs scripts/setup.sh (package check, Postgres and
Redis check, migrations) and scripts/run.sh (stack-prepare + honcho on the Procfile), with the
clone's own code on sys.path ahead of anything else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from mailgenius import ops
from tests.conftest import free_port
from tests.stack import http_get, wait_until  # tests/stack.py: the lead's helpers

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
#: the issue's bound for health and targets after `make run`
UP_WITHIN = 60.0


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (honcho starts each process in its own session, so
    process groups do not reach them: the parent links do)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _make_clone(tmp: Path) -> Path:
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the clone's code first, then this environment's third-party packages
    (site / "_mailgenius_clone.pth").write_text(f"{clone}\n{sysconfig.get_paths()['purelib']}\n")
    py = venv / "bin" / "python"
    for name, entry in (("mailgenius", "mailgenius.cli:main"), ("honcho", "honcho.command:main"),
                        ("dramatiq", "dramatiq.cli:main")):
        mod, func = entry.split(":")
        script = venv / "bin" / name
        script.write_text(f"#!{py}\nimport sys\nfrom {mod} import {func}\nsys.exit({func}())\n")
        script.chmod(0o755)
    # setup.sh: the project and the lock are installed (see the module docstring); the stamp holds
    # the digest of what was installed, as setup.sh computes it
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes() + (clone / "requirements/dev.txt").read_bytes())
    (venv / ".installed").write_text(digest.hexdigest() + "\n")
    return clone


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory, database_url, redis_url, redis_prefix):
    tmp = tmp_path_factory.mktemp("makerun")
    clone = _make_clone(tmp)
    ports = {c.env: str(free_port()) for c in ops.COMPONENTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILGENIUS_", "dramatiq_", "PROMETHEUS_MULTIPROC"))}
    env.update(ports)
    env.update({
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "BROKER_URL": redis_url,
        "MAILGENIUS_REDIS_PREFIX": redis_prefix, "MAILGENIUS_DATA_DIR": str(tmp / "var"),
        "MAILGENIUS_SCRAPE_INTERVAL": "2s", "MAILGENIUS_WORKER_PROCESSES": "1", "MAILGENIUS_WORKER_THREADS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    log_path = tmp / "make-run.log"
    log = open(log_path, "wb")
    started = time.monotonic()
    proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    stack = {"proc": proc, "clone": clone, "env": env, "ports": ports, "tmp": tmp, "started": started,
             "log": lambda tail=6000: log_path.read_text(errors="replace")[-tail:]}
    try:
        yield stack
    finally:
        if proc.poll() is None:
            # a failed test left the stack up: stop it (every descendant, by pid)
            below = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            _kill_all({p for p in below | descendants(proc.pid) if _alive(p)} | ({proc.pid} if proc.poll() is None else set()))
            proc.wait(10)


def _health(url: str) -> str | None:
    try:
        status, body = http_get(url + "/api/health", timeout=3)
    except OSError:
        return None
    try:
        return json.loads(body).get("status")
    except ValueError:
        return None


def _targets(prom_url: str) -> list[dict]:
    _, body = http_get(prom_url + "/api/v1/targets?state=active", timeout=3)
    return json.loads(body)["data"]["activeTargets"]


def _cli(stack, *args, timeout=120, only_data_dir=False) -> subprocess.CompletedProcess:
    """Run the clone's `mailgenius` as an operator in a second terminal would."""
    env = stack["env"]
    if only_data_dir:  # nothing but where the stack keeps its state: stack.env tells the rest
        env = {k: v for k, v in env.items() if not k.startswith("MAILGENIUS_") and k not in
               ("DATABASE_URL", "REDIS_URL", "BROKER_URL")}
        env["MAILGENIUS_DATA_DIR"] = stack["env"]["MAILGENIUS_DATA_DIR"]
    return subprocess.run([str(stack["clone"] / ".venv/bin/mailgenius"), *args], cwd=stack["clone"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_make_run_brings_everything_up_within_60s(running_stack):
    s = running_stack
    p = s["ports"]
    services = {n: f"http://127.0.0.1:{p[ops.BY_NAME[n].env]}" for n in ("sender", "importer", "exporter")}
    prom = f"http://127.0.0.1:{p['MAILGENIUS_PROMETHEUS_PORT']}"
    jobs = {c.job for c in ops.COMPONENTS if c.job}

    def everything_up():
        if s["proc"].poll() is not None:
            raise AssertionError(f"make run exited with {s['proc'].returncode}:\n{s['log']()}")
        states = {n: _health(u) for n, u in services.items()}
        if any(v != "healthy" for v in states.values()):
            return None
        targets = _targets(prom)
        if {t["labels"]["job"] for t in targets} != jobs or any(t["health"] != "up" for t in targets):
            return None
        return states, targets

    deadline = s["started"] + UP_WITHIN
    try:
        states, targets = wait_until(everything_up, max(1.0, deadline - time.monotonic()), interval=0.5,
                                     what="every health endpoint healthy and every target up")
    except TimeoutError:
        detail = {n: _health(u) for n, u in services.items()}
        try:
            down = [(t["labels"]["job"], t["health"], t["lastError"]) for t in _targets(prom) if t["health"] != "up"]
        except Exception as exc:  # Prometheus itself not up
            down = repr(exc)
        pytest.fail(f"not up within {UP_WITHIN:g} s: health {detail}; targets not up {down}\n{s['log']()}")
    elapsed = time.monotonic() - s["started"]
    print(f"make run: everything healthy and {len(targets)} targets up after {elapsed:.1f} s")
    # every target carries service=<job>
    assert all(t["labels"].get("service") == t["labels"]["job"] for t in targets)
    # run.sh printed where each thing is
    out = s["log"](10**7)
    for comp in ops.COMPONENTS:
        assert f"127.0.0.1:{p[comp.env]}" in out, f"run.sh did not print where {comp.name} is"


def test_demo_then_status_exits_zero(running_stack):
    s = running_stack
    if s["proc"].poll() is not None:
        pytest.fail(f"make run is not running:\n{s['log']()}")
    # When the operator runs the demo from a second terminal (only the data dir is known)
    demo = _cli(s, "demo", "--leads", "120", "--seed", "7", only_data_dir=True)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "posted signed events" in demo.stdout
    counts = re.search(r"campaign counts now: (.*)", demo.stdout).group(1)
    got = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", counts))
    # Then the campaign reached every imported lead, and the events were applied
    assert got["recipients"] == 120 and got["sent"] == 120 and got["failed"] == 0
    assert got["delivered"] + got["bounced"] == 120 and got["bounced"] >= 1 and got["opened"] >= 1
    # And the sink holds the messages
    assert len(list((Path(s["env"]["MAILGENIUS_DATA_DIR"]) / "sink").glob("*.eml"))) >= 120
    # When asking for the status
    status = _cli(s, "status", only_data_dir=True)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("sender", "importer", "exporter", "sender-worker", "importer-worker", "postgres", "redis",
                 "smtp-sink", "prometheus", "alertmanager", "postgres-exporter", "redis-exporter", "node-exporter"):
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith(name + " "))
        assert "unhealthy" not in line, line
    assert "email-sending" in status.stdout and "lead-import" in status.stdout
    assert "ACTIVE ALERTS" in status.stdout and "unknown" not in status.stdout.split("ACTIVE ALERTS")[1].splitlines()[0]
    check = _cli(s, "check", "workers", only_data_dir=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_report_daily_has_non_empty_charts(running_stack):
    s = running_stack
    prom = f"http://127.0.0.1:{s['ports']['MAILGENIUS_PROMETHEUS_PORT']}"
    # every send scraped, and rates need two scrapes after the counters moved
    # (the worker's dramatiq counters are another target: their rate needs two samples of each series)
    for expr in ("sum(mailgenius_emails_sent_total) >= 120", "sum(rate(mailgenius_emails_sent_total[1m])) > 0",
                 "min(count_over_time(dramatiq_messages_total[10m])) >= 2"):
        wait_until(lambda e=expr: json.loads(http_get(prom + "/api/v1/query?" + urlencode({"query": e}))[1])
                   ["data"]["result"], 30, interval=1, what=f"{expr} in Prometheus")
    out = s["tmp"] / "report-daily.html"
    res = _cli(s, "report", "daily", "--out", str(out), only_data_dir=True)
    assert res.returncode == 0, res.stdout + res.stderr
    html = out.read_text()
    charts = re.findall(r'<figure class="chart" data-title="([^"]+)" data-series="(\d+)" data-points="(\d+)">\s*'
                        r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert len(charts) >= 10
    empty = [title for title, series, points, _ in charts if int(series) == 0 or int(points) == 0]
    assert not empty, f"charts without data: {empty}\n{res.stdout}"
    for title, _, _, b64 in charts:
        png = base64.b64decode(b64)
        assert png.startswith(b"\x89PNG") and len(png) > 5000, title
    for section in ("System performance", "Errors and incidents", "Email delivery", "Queues", "Resource use",
                    "Trends", "Recommendations"):
        assert section in html
    assert "Demo campaign" in html  # the campaign table from Postgres
    # the period's figures count what the demo did (increase() alone misses series born in it)
    email = html.split("3. Email delivery")[1].split("4. Queues")[0]
    figures = dict(re.findall(r'<div class="label">([^<]+)</div><div class="value">([^<]+)</div>', email))
    sent = float(figures["sent"].replace(" ", ""))
    assert sent == 120, figures  # series born in the period count exactly
    events = dict(re.findall(r"<tr><td>(\w+)</td><td>([\d ]+)</td></tr>", email))
    assert float(events["delivered"].replace(" ", "")) >= 100, events


def test_ctrl_c_stops_everything(running_stack):
    s = running_stack
    proc = s["proc"]
    assert proc.poll() is None, s["log"]()
    below = descendants(proc.pid)
    assert len(below) >= len(ops.COMPONENTS)
    # Ctrl-C in a terminal: SIGINT to the foreground process group (make, and honcho under it)
    stopped_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(30)
    took = time.monotonic() - stopped_at
    listening = []
    for comp in ops.COMPONENTS:
        port = int(s["ports"][comp.env])
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                listening.append(comp.name)
    assert not listening, f"still listening after Ctrl-C: {listening}\n{s['log']()}"
    left = {p for p in below if _alive(p)}
    assert not left, f"processes left after Ctrl-C: {left}"
    out = s["log"](10**7)
    assert "SIGINT received" in out
    print(f"Ctrl-C: everything stopped in {took:.1f} s")
