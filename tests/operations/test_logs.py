"""`mailgenius logs` over real log files written by the supervisor's rotating handler: service
and level filters, rotated files read in order, --follow across a rotation, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from console import logs
from console.supervisor import file_logger, json_line
from tests.stack import wait_until

MAILGENIUS = str(Path(sys.executable).parent / "mailgenius")


def run(*args, data_dir: Path, timeout=30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGENIUS_")}
    env["MAILGENIUS_DATA_DIR"] = str(data_dir)
    return subprocess.run([MAILGENIUS, "logs", *args], env=env, capture_output=True, text=True, timeout=timeout)


def write(log_dir: Path, service: str, lines: list[tuple[str, str]], max_bytes: int | None = None):
    logger = file_logger(log_dir, service)
    if max_bytes:
        logger.handlers[0].maxBytes = max_bytes
    for level, message in lines:
        logger.info(json_line(service, json.dumps({"level": level, "message": message})))
        time.sleep(0.002)  # distinct timestamps
    return logger


def test_filters_by_service_and_level_across_rotated_files(tmp_path):
    log_dir = tmp_path / "log"
    # enough lines, with a tiny size limit, to rotate several times
    write(log_dir, "sender", [("info" if i % 10 else "error", f"sender line {i}") for i in range(60)], max_bytes=2000)
    write(log_dir, "importer", [("warning", "importer warns")])
    assert (log_dir / "sender.log.1").exists()
    res = run("--service", "sender", "--level", "error", "--lines", "0", "--json", data_dir=tmp_path)
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in res.stdout.splitlines()]
    kept = [f"sender line {i}" for i in range(60) if i % 10 == 0]
    # oldest first; what rotated away beyond the 5 kept files is gone, the rest is in order
    assert [g["message"] for g in got] == kept[-len(got):] and len(got) >= 3
    assert all(g["level"] == "error" and g["service"] == "sender" for g in got)
    # every service, warnings and above, readable text
    res = run("--level", "warning", "--lines", "0", data_dir=tmp_path)
    assert "WARNING  importer: importer warns" in res.stdout and "sender line 1\n" not in res.stdout
    # --lines keeps the last N
    res = run("--service", "sender", "--lines", "3", "--json", data_dir=tmp_path)
    assert [json.loads(x)["message"] for x in res.stdout.splitlines()] == [f"sender line {i}" for i in (57, 58, 59)]


def test_bad_input_gets_a_clear_error(tmp_path):
    res = run(data_dir=tmp_path)
    assert res.returncode == 1 and "does not exist" in res.stderr
    write(tmp_path / "log", "sender", [("info", "x")])
    res = run("--service", "nope", data_dir=tmp_path)
    assert res.returncode == 2 and "no log for nope" in res.stderr and "sender" in res.stderr
    res = run("--level", "loud", data_dir=tmp_path)
    assert res.returncode == 2 and "unknown level" in res.stderr


def test_follow_prints_new_lines_also_after_a_rotation(tmp_path):
    log_dir = tmp_path / "log"
    logger = write(log_dir, "worker", [("info", "old line")], max_bytes=400)
    seen: list[dict] = []
    stop = threading.Event()
    t = threading.Thread(target=logs.follow, args=(log_dir, ["worker"], 20, seen.append),
                         kwargs={"poll": 0.05, "stop": stop.is_set}, daemon=True)
    t.start()
    time.sleep(0.3)
    for i in range(12):  # several rotations at 400 bytes
        logger.info(json_line("worker", json.dumps({"level": "info", "message": f"new {i}"})))
        time.sleep(0.06)
    try:
        wait_until(lambda: [o["message"] for o in seen][-1:] == ["new 11"], 5, what="the last line followed")
    finally:
        stop.set()
        t.join(2)
    messages = [o["message"] for o in seen]
    assert "old line" not in messages
    assert messages == [f"new {i}" for i in range(12)], messages
