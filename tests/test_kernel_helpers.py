"""The kernel helpers the services, tools and console share (issue 17: one copy each): generated
files written only when changed, the commands' exit codes, the health framework's overall status
and SMTP check, a queue's status rules."""

from __future__ import annotations

import os

import pytest

from mailgenius import contract
from mailgenius.generated import remove_stale, write_if_changed
from mailgenius.health import (
    DEGRADED,
    HEALTHY,
    UNHEALTHY,
    CheckResult,
    HealthRegistry,
    smtp_check,
    worst,
)
from mailgenius.queues import waiting_status, workers_status
from mailgenius.serve import run_command
from mailgenius.settings import SettingsError
from sender.sink import start_sink
from tests.conftest import free_port

# -- generated files ----------------------------------------------------------------------------


def test_write_if_changed_writes_only_what_changed_and_check_writes_nothing(tmp_path):
    files = {"a/one.yml": "one\n", "b/c/two.yml": "two\n"}
    # Given nothing on disk, --check reports both and writes nothing
    assert write_if_changed(files, tmp_path, check=True) == [tmp_path / "a/one.yml", tmp_path / "b/c/two.yml"]
    assert not (tmp_path / "a").exists()
    # When writing, both are written (folders created)
    assert write_if_changed(files, tmp_path) == [tmp_path / "a/one.yml", tmp_path / "b/c/two.yml"]
    assert (tmp_path / "b/c/two.yml").read_text() == "two\n"
    # Then a second build changes nothing and leaves the unchanged file untouched (its mtime too)
    past = 1_000_000_000
    os.utime(tmp_path / "a/one.yml", (past, past))
    assert write_if_changed(files, tmp_path) == []
    assert write_if_changed(files, tmp_path, check=True) == []
    assert (tmp_path / "a/one.yml").stat().st_mtime == past
    # And one changed file is the only one rewritten (check: reported, not written)
    changed = {**files, "a/one.yml": "uno\n"}
    assert write_if_changed(changed, tmp_path, check=True) == [tmp_path / "a/one.yml"]
    assert (tmp_path / "a/one.yml").read_text() == "one\n"
    assert write_if_changed(changed, tmp_path) == [tmp_path / "a/one.yml"]
    assert (tmp_path / "a/one.yml").read_text() == "uno\n"


def test_write_if_changed_takes_absolute_paths(tmp_path):
    target = tmp_path / "x" / "dash.json"
    assert write_if_changed({target: "{}\n"}, tmp_path / "elsewhere") == [target]
    assert target.read_text() == "{}\n"


def test_remove_stale_removes_or_only_reports(tmp_path):
    stale = tmp_path / "old.yml"
    stale.write_text("old\n")
    assert remove_stale([stale], check=True) == [stale] and stale.exists()
    assert remove_stale([stale]) == [stale] and not stale.exists()


# -- exit codes ---------------------------------------------------------------------------------


def _raise(exc):
    def command():
        raise exc

    return command


def test_run_command_maps_errors_to_exit_codes(capsys):
    assert run_command(lambda: None) == 0
    assert run_command(lambda: 3) == 3
    assert run_command(_raise(SettingsError("MAILGENIUS_X", "must be a number"))) == 2
    assert "mailgenius: configuration error: MAILGENIUS_X: must be a number" in capsys.readouterr().err
    assert run_command(_raise(KeyboardInterrupt())) == 130
    assert run_command(_raise(ConnectionRefusedError("no Redis"))) == 1
    assert "mailgenius: ConnectionRefusedError: no Redis" in capsys.readouterr().err
    with pytest.raises(ValueError):  # a bug is not an exit code: it keeps its traceback
        run_command(_raise(ValueError("bug")))


# -- health framework -----------------------------------------------------------------------------


def test_worst_is_the_overall_status():
    assert worst([]) == HEALTHY
    assert worst([HEALTHY, DEGRADED, HEALTHY]) == DEGRADED
    assert worst(iter([DEGRADED, UNHEALTHY, HEALTHY])) == UNHEALTHY


async def test_smtp_check_against_a_real_sink_and_a_closed_port():
    port = free_port()
    controller, _handler = start_sink("127.0.0.1", port)
    try:
        registry = HealthRegistry(service="test", timeout=3.0)
        registry.add("up", smtp_check("127.0.0.1", port))
        registry.add("down", smtp_check("127.0.0.1", free_port()))
        overall, results = await registry.run_results()
    finally:
        controller.stop()
    assert results["up"].status == HEALTHY and results["up"].detail == f"smtp 127.0.0.1:{port} reachable"
    assert results["down"].status == UNHEALTHY and "SMTPConnectError" in results["down"].detail
    assert overall == UNHEALTHY


async def test_run_results_keeps_data_out_of_the_health_document():
    registry = HealthRegistry(service="test")

    async def with_data():
        return CheckResult(DEGRADED, "2 of 3 up", data={"down": ["x"]})

    registry.add("targets", with_data)
    overall, results = await registry.run_results()
    assert overall == DEGRADED and results["targets"].data == {"down": ["x"]}
    _, document = await registry.run()
    assert document["targets"].keys() == {"status", "latency_ms", "detail"}


# -- queue status rules ---------------------------------------------------------------------------


def test_queue_status_rules():
    limit = contract.get().threshold("queue_waiting_messages")
    assert waiting_status(int(limit)) == HEALTHY and waiting_status(int(limit) + 1) == DEGRADED
    assert waiting_status(5, max_waiting=4) == DEGRADED
    assert workers_status(2, 1000) == HEALTHY
    assert workers_status(0, 0) == DEGRADED
    assert workers_status(0, 1) == UNHEALTHY
