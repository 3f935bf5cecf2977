"""The supervisor on its own, with real processes (sh, sleep, python): a death restarts only that
process, with a growing backoff, logged; leftovers and orphans of a dead process are killed before
its restart; SIGINT stops everything within the stop timeout, orphans included; every output line
lands as JSON in <log dir>/<process>.log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from console.supervisor import descendants, json_line, parse_procfile
from tests.stack import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def supervise(tmp_path):
    started = []

    def start(procfile: str, **env):
        (tmp_path / "Procfile").write_text(procfile)
        full = {**os.environ, "MAILGENIUS_DATA_DIR": str(tmp_path / "var"), "MAILGENIUS_STOP_TIMEOUT": "5",
                "MAILGENIUS_RESTART_BACKOFF_MIN": "0.3", "MAILGENIUS_RESTART_BACKOFF_MAX": "1.2", **env}
        out = open(tmp_path / "out.txt", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "console.supervisor", "-f", str(tmp_path / "Procfile")],
                                cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        started.append(proc)
        state = tmp_path / "var" / "run" / "supervisor.json"

        def procs():
            try:
                return json.loads(state.read_text())["processes"]
            except (OSError, ValueError):
                return {}

        proc.procs = procs
        proc.output = lambda: (tmp_path / "out.txt").read_text(errors="replace")
        proc.log_dir = tmp_path / "var" / "log"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            below = descendants(proc.pid)
            proc.kill()
            proc.wait(5)
            for pid in below:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_procfile_parsing_refuses_bad_lines():
    assert parse_procfile("# c\n\na: exec x\nb-2: y --z\n") == {"a": "exec x", "b-2": "y --z"}
    with pytest.raises(ValueError, match="line 1"):
        parse_procfile("not a process line")
    with pytest.raises(ValueError, match="defined twice"):
        parse_procfile("a: x\na: y\n")


def test_json_line_keeps_json_and_wraps_text():
    obj = json.loads(json_line("sender", '{"level": "warning", "message": "m", "service": "sender"}'))
    assert obj["level"] == "warning" and obj["message"] == "m" and "ts" in obj
    obj = json.loads(json_line("prometheus", 'ts=2026 level=error msg="boom"'))
    assert obj == {**obj, "service": "prometheus", "level": "error", "message": 'ts=2026 level=error msg="boom"'}
    line = "[2026-12-05 12:00:00,000] [PID 7] [MainThread] [dramatiq.MainProcess] [CRITICAL] Worker with PID 9 exited"
    assert json.loads(json_line("sender-worker", line))["level"] == "critical"
    assert json.loads(json_line("x", "Warning: low disk"))["level"] == "warning"
    assert json.loads(json_line("x", "listening on 127.0.0.1:9090"))["level"] == "info"


def test_a_dead_process_is_restarted_with_backoff_and_the_others_keep_running(supervise):
    sup = supervise("a: exec sleep 600\nb: exec sleep 600\ncrash: echo starting; exit 7\n")
    wait_until(lambda: sup.procs().get("a", {}).get("pid") and sup.procs().get("b", {}).get("pid"), 10, what="started")
    first = sup.procs()
    # the crashing process is retried with a growing backoff, capped (wait for the 4th exit's
    # line itself: the 4th start is recorded before that run has exited and been logged)
    def delays() -> list[float]:
        return [float(x) for x in re.findall(r"crash exited with code 7 after [\d.]+ s; restarting in ([\d.]+) s",
                                             sup.output())]

    wait_until(lambda: len(delays()) >= 4, 15, what="crash restarted 4 times")
    assert "crash exited with code 7 after" in sup.output()
    assert delays()[:4] == [0.3, 0.6, 1.2, 1.2], delays()
    # When a is killed with -9, it comes back; b is untouched
    os.kill(first["a"]["pid"], signal.SIGKILL)
    wait_until(lambda: sup.procs()["a"]["starts"] == 2 and sup.procs()["a"]["pid"], 10, what="a restarted")
    assert sup.procs()["b"] == {**first["b"], **{k: v for k, v in sup.procs()["b"].items() if k not in ("pid", "starts")}}
    assert sup.procs()["b"]["pid"] == first["b"]["pid"] and _alive(first["b"]["pid"])
    assert sup.poll() is None
    assert "a was killed by SIGKILL" in sup.output()
    # every line is in the process's log, as JSON
    lines = [json.loads(x) for x in (sup.log_dir / "crash.log").read_text().splitlines()]
    assert any(x["message"] == "starting" and x["service"] == "crash" for x in lines)
    sup_lines = [json.loads(x) for x in (sup.log_dir / "supervisor.log").read_text().splitlines()]
    assert any(x["level"] == "error" and "a was killed by SIGKILL" in x["message"] for x in sup_lines)


def test_leftovers_and_orphans_die_with_their_process_before_it_restarts(supervise, tmp_path):
    # a group leader with a child in its group and a grandchild that escaped into its own session
    sup = supervise("g: sleep 600 & setsid sleep 601 & echo started; wait\n")
    wait_until(lambda: sup.procs().get("g", {}).get("pid"), 10, what="g started")
    leader = sup.procs()["g"]["pid"]
    wait_until(lambda: len(descendants(leader)) == 2, 10, what="the two sleeps")
    kids = descendants(leader)
    os.kill(leader, signal.SIGKILL)
    wait_until(lambda: sup.procs()["g"]["starts"] == 2, 10, what="g restarted")
    wait_until(lambda: not any(_alive(p) for p in kids), 5, what="the old group's processes gone")


def test_sigint_stops_everything_within_the_timeout_orphans_included(supervise):
    # stubborn ignores SIGTERM; its setsid child escaped its group
    sup = supervise("stubborn: trap '' TERM; setsid sleep 900 & while true; do sleep 0.2; done\n"
                    "polite: exec sleep 900\n")
    wait_until(lambda: all(v.get("pid") for v in sup.procs().values()) and len(sup.procs()) == 2, 10, what="started")
    wait_until(lambda: len(descendants(sup.pid)) >= 4, 10, what="every process")
    below = descendants(sup.pid)
    t0 = time.monotonic()
    os.kill(sup.pid, signal.SIGINT)
    sup.wait(20)
    took = time.monotonic() - t0
    assert took < 5 + 3, took  # MAILGENIUS_STOP_TIMEOUT=5
    assert sup.returncode == 0
    left = [p for p in below if _alive(p)]
    assert not left, left
    out = sup.output()
    assert "SIGINT received" in out and "still running after 5 s, killing: stubborn" in out
