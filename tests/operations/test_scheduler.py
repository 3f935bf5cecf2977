"""The scheduler: cron-like schedules (parsing, next run, bad input), and real runs of the real
tasks against the test database: outcome, duration and failures as metrics, kept across a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from console.scheduler import DEFAULT_SCHEDULES, Schedule, ScheduleError, Scheduler, load_schedules
from tests.conftest import cli_env

UTC = dt.UTC


def at(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(("text", "after", "expected"), [
    ("30 2 * * *", at(2026, 1, 1, 2, 30), at(2026, 1, 2, 2, 30)),
    ("30 2 * * *", at(2026, 1, 1, 2, 29, 59), at(2026, 1, 1, 2, 30)),
    ("0 7 * * 1", at(2026, 12, 5, 12, 0), at(2026, 12, 7, 7, 0)),  # Saturday -> Monday
    ("0 4 * * 0", at(2026, 12, 5, 12, 0), at(2026, 12, 6, 4, 0)),  # Sunday
    ("0 4 * * 7", at(2026, 12, 5, 12, 0), at(2026, 12, 6, 4, 0)),  # 7 is Sunday too
    ("*/15 * * * *", at(2026, 1, 1, 10, 7), at(2026, 1, 1, 10, 15)),
    ("0 0 29 2 *", at(2026, 3, 1), at(2028, 2, 29)),
    ("0 9 1 * 1", at(2026, 12, 1, 10), at(2026, 12, 7, 9)),  # day 1 OR a Monday, like cron
    ("@daily", at(2026, 1, 1, 5), at(2026, 1, 2)),
    ("@every 90s", at(2026, 1, 1, 5), at(2026, 1, 1, 5, 1, 30)),
    ("5,10-12 3 * * *", at(2026, 1, 1, 3, 10), at(2026, 1, 1, 3, 11)),
])
def test_next_run(text, after, expected):
    assert Schedule.parse(text).next_after(after) == expected


@pytest.mark.parametrize("text", ["", "* * * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "a * * * *",
                                  "5-2 * * * *", "@every 0s", "@yearly-ish"])
def test_bad_schedules_are_refused(text):
    with pytest.raises(ScheduleError):
        Schedule.parse(text)


def test_schedules_from_the_environment():
    got = load_schedules({"MAILGENIUS_SCHEDULE_BACKUP": "15 1 * * *", "MAILGENIUS_SCHEDULE_REPORT_WEEKLY": "off"})
    assert got["backup"].text == "15 1 * * *" and got["report-weekly"] is None
    assert got["db-maintenance"].text == DEFAULT_SCHEDULES["db-maintenance"]
    with pytest.raises(ScheduleError, match="MAILGENIUS_SCHEDULE_CLEANUP_UPLOADS"):
        load_schedules({"MAILGENIUS_SCHEDULE_CLEANUP_UPLOADS": "every day"})


def _metric(scheduler: Scheduler, line_start: str) -> float:
    for line in generate_latest(scheduler.metrics.registry).decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in the scheduler's metrics")


def test_runs_record_success_failure_and_duration_and_survive_a_restart(settings, tmp_path):
    state = Path(settings.data_dir) / "run" / "scheduler-state.json"
    cmd = [sys.executable, "-m", "console"]
    sched = Scheduler(cli_env(settings), state_path=state, command=cmd)
    created = _metric(sched, "mailgenius_backup_last_success_timestamp_seconds ")
    # a real backup of the test database succeeds
    assert asyncio.run(sched.run_task("backup"))
    ok_at = _metric(sched, 'mailgenius_scheduled_task_last_success_timestamp_seconds{task="backup"}')
    assert ok_at >= created
    assert _metric(sched, "mailgenius_backup_last_success_timestamp_seconds ") == ok_at
    assert _metric(sched, 'mailgenius_scheduled_task_duration_seconds{task="backup"}') > 0
    assert _metric(sched, 'mailgenius_scheduled_task_last_run_success{task="backup"}') == 1
    assert list((Path(settings.data_dir) / "backups").glob("mailgenius-*.tar"))
    # the same task against a database that does not answer fails, and is counted
    bad = Scheduler(cli_env(settings, DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing"), state_path=state, command=cmd)
    assert not asyncio.run(bad.run_task("backup"))
    assert _metric(bad, 'mailgenius_scheduled_task_failures_total{task="backup"}') == 1
    assert _metric(bad, 'mailgenius_scheduled_task_last_run_success{task="backup"}') == 0
    # the last success is kept (not reset by the failure), also by a new scheduler process
    again = Scheduler(cli_env(settings), state_path=state, command=cmd)
    assert _metric(again, "mailgenius_backup_last_success_timestamp_seconds ") == ok_at
    assert _metric(again, 'mailgenius_scheduled_task_last_run_success{task="backup"}') == 0


def test_the_loop_runs_a_task_on_its_schedule(settings):
    env = cli_env(settings, MAILGENIUS_SCHEDULE_CLEANUP_UPLOADS="@every 1s", MAILGENIUS_SCHEDULE_BACKUP="off",
               MAILGENIUS_SCHEDULE_REPORT_DAILY="off", MAILGENIUS_SCHEDULE_REPORT_WEEKLY="off",
               MAILGENIUS_SCHEDULE_DB_MAINTENANCE="off")
    sched = Scheduler(env, state_path=Path(settings.data_dir) / "run" / "s.json",
                      command=[sys.executable, "-m", "console"])

    async def run():
        task = asyncio.ensure_future(sched.run(None))
        for _ in range(300):
            await asyncio.sleep(0.1)
            if sched.state["tasks"].get("cleanup-uploads", {}).get("last_success"):
                break
        sched.stop()
        await asyncio.wait_for(task, 20)

    asyncio.run(run())
    assert sched.state["tasks"]["cleanup-uploads"]["ok"] is True
    assert "backup" not in sched.state["tasks"]
