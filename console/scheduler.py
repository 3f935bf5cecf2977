"""The scheduler of ``make run`` (one supervised process): the operations guide's daily and weekly
tasks on a cron-like schedule, each run's outcome and duration as Prometheus metrics.

Tasks and their default schedules (UTC; change one with ``MAILGENIUS_SCHEDULE_<TASK>``, e.g.
``MAILGENIUS_SCHEDULE_BACKUP="15 1 * * *"``; ``off`` disables a task):

==================  ==============  ====================================================
task                default         runs
==================  ==============  ====================================================
backup              ``30 2 * * *``  ``mailgenius backup`` (database dump + files, kept 7)
cleanup-uploads     ``0 3 * * *``   ``mailgenius cleanup-uploads`` (files older than 24 h)
report-daily        ``0 6 * * *``   ``mailgenius report daily`` into <data dir>/reports
report-weekly       ``0 7 * * 1``   ``mailgenius report weekly`` into <data dir>/reports
db-maintenance      ``0 4 * * 0``   ``mailgenius db-maintenance`` (VACUUM ANALYZE)
==================  ==============  ====================================================

A schedule is five cron fields (minute hour day-of-month month day-of-week; ``*``, ``a-b``,
``*/n``, ``a-b/n`` and lists; day-of-week 0-7, Sunday 0 or 7), ``@hourly``, ``@daily``,
``@weekly``, or ``@every <n>s|m|h`` (an interval; tests use it).

Metrics (``MAILGENIUS_SCHEDULER_METRICS_PORT``, default 9194; job ``scheduler``):
``mailgenius_scheduled_task_last_success_timestamp_seconds{task}``,
``mailgenius_scheduled_task_last_run_timestamp_seconds{task}``,
``mailgenius_scheduled_task_last_run_success{task}`` (1/0),
``mailgenius_scheduled_task_duration_seconds{task}`` (the last run),
``mailgenius_scheduled_task_failures_total{task}``,
``mailgenius_scheduled_task_next_run_timestamp_seconds{task}`` and
``mailgenius_backup_last_success_timestamp_seconds``. Outcomes are kept in
``<data dir>/run/scheduler-state.json`` so a restart does not forget them; before the first
backup ever succeeds, the backup timestamp is the time the scheduler first started (so
BackupTooOld fires when no backup succeeded within 26 h of installing).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mailgenius import metrics as m

log = logging.getLogger("mailgenius.scheduler")

#: task -> default schedule
DEFAULT_SCHEDULES: dict[str, str] = {
    "backup": "30 2 * * *",
    "cleanup-uploads": "0 3 * * *",
    "report-daily": "0 6 * * *",
    "report-weekly": "0 7 * * 1",
    "db-maintenance": "0 4 * * 0",
}
#: a task running longer than this is killed and counts as failed
TASK_TIMEOUT = 3 * 3600.0
DEFAULT_METRICS_PORT = 9194

_ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0"}
_EVERY = re.compile(r"^@every\s+(\d+(?:\.\d+)?)\s*([smh])$")


class ScheduleError(ValueError):
    pass


def _field(text: str, lo: int, hi: int, what: str) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, raw_step = part.split("/", 1)
            if not raw_step.isdigit() or int(raw_step) == 0:
                raise ScheduleError(f"{what}: bad step {raw_step!r}")
            step = int(raw_step)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise ScheduleError(f"{what}: bad range {part!r}")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step != 1:
                end = hi
        else:
            raise ScheduleError(f"{what}: {part!r} is not a number, range or *")
        if start < lo or end > hi or start > end:
            raise ScheduleError(f"{what}: {part!r} outside {lo}-{hi}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    text: str
    every: float | None = None
    minutes: frozenset[int] = frozenset()
    hours: frozenset[int] = frozenset()
    days: frozenset[int] = frozenset()
    months: frozenset[int] = frozenset()
    weekdays: frozenset[int] = frozenset()  #: 0 = Monday (Python's weekday())
    dom_any: bool = True
    dow_any: bool = True

    @classmethod
    def parse(cls, text: str) -> Schedule:
        raw = " ".join(text.split())
        every = _EVERY.match(raw)
        if every:
            seconds = float(every.group(1)) * {"s": 1, "m": 60, "h": 3600}[every.group(2)]
            if seconds <= 0:
                raise ScheduleError(f"{text!r}: the interval must be above 0")
            return cls(text=raw, every=seconds)
        fields = _ALIASES.get(raw, raw).split(" ")
        if len(fields) != 5:
            raise ScheduleError(f"{text!r}: expected 5 fields (minute hour day month weekday), @daily or @every 10m")
        minute, hour, dom, month, dow = fields
        cron_dow = _field(dow, 0, 7, "day of week")
        return cls(text=raw, minutes=_field(minute, 0, 59, "minute"), hours=_field(hour, 0, 23, "hour"),
                   days=_field(dom, 1, 31, "day of month"), months=_field(month, 1, 12, "month"),
                   weekdays=frozenset((d - 1) % 7 for d in cron_dow), dom_any=dom == "*", dow_any=dow == "*")

    def _day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom, dow = day.day in self.days, day.weekday() in self.weekdays
        if self.dom_any or self.dow_any:  # cron: when both are restricted, either one matches
            return dom and dow
        return dom or dow

    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first time strictly after ``after`` (an aware UTC datetime) this schedule fires."""
        if self.every is not None:
            return after + dt.timedelta(seconds=self.every)
        t = (after + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
        for _ in range(366 * 5):
            if self._day_matches(t.date()):
                for hour in sorted(h for h in self.hours if h >= t.hour):
                    for minute in sorted(self.minutes):
                        if hour == t.hour and minute < t.minute:
                            continue
                        return t.replace(hour=hour, minute=minute)
            t = (t + dt.timedelta(days=1)).replace(hour=0, minute=0)
        raise ScheduleError(f"{self.text!r} never fires")


def task_commands(data_dir: str) -> dict[str, list[str]]:
    """The ``mailgenius`` arguments of every task."""
    reports = os.path.join(data_dir, "reports")
    stamp = "{date}"
    return {
        "backup": ["backup", "--keep", "7"],
        "cleanup-uploads": ["cleanup-uploads", "--older-than-hours", "24"],
        "report-daily": ["report", "daily", "--out", os.path.join(reports, f"daily-{stamp}.html")],
        "report-weekly": ["report", "weekly", "--out", os.path.join(reports, f"weekly-{stamp}.html")],
        "db-maintenance": ["db-maintenance"],
    }


def load_schedules(env: dict[str, str]) -> dict[str, Schedule | None]:
    """Task -> schedule (None when turned off), from ``MAILGENIUS_SCHEDULE_<TASK>`` or the defaults."""
    out: dict[str, Schedule | None] = {}
    for task, default in DEFAULT_SCHEDULES.items():
        var = "MAILGENIUS_SCHEDULE_" + task.upper().replace("-", "_")
        text = (env.get(var) or default).strip()
        if text.lower() in ("off", "none", "disabled"):
            out[task] = None
            continue
        try:
            out[task] = Schedule.parse(text)
        except ScheduleError as exc:
            raise ScheduleError(f"{var}: {exc}") from None
    return out


class Metrics:
    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry or CollectorRegistry()
        labels = ["task"]
        self.last_success = Gauge(m.SCHEDULED_TASK_LAST_SUCCESS, "Unix time of the task's last successful run",
                                  labels, registry=self.registry)
        self.last_run = Gauge(m.SCHEDULED_TASK_LAST_RUN, "Unix time the task's last run ended", labels,
                              registry=self.registry)
        self.last_ok = Gauge(m.SCHEDULED_TASK_LAST_RUN_SUCCESS, "1 when the task's last run succeeded, 0 when it failed",
                             labels, registry=self.registry)
        self.duration = Gauge(m.SCHEDULED_TASK_DURATION, "Seconds the task's last run took", labels,
                              registry=self.registry)
        self.failures = Counter(m.SCHEDULED_TASK_FAILURES.removesuffix("_total"), "Failed runs of the task", labels,
                                registry=self.registry)
        self.next_run = Gauge(m.SCHEDULED_TASK_NEXT_RUN, "Unix time of the task's next run", labels,
                              registry=self.registry)
        self.backup_last_success = Gauge(m.BACKUP_LAST_SUCCESS, "Unix time of the last successful backup",
                                         registry=self.registry)


class Scheduler:
    def __init__(self, env: dict[str, str], *, state_path: Path, metrics: Metrics | None = None,
                 command: list[str] | None = None):
        self.env = env
        self.schedules = load_schedules(env)
        self.data_dir = env.get("MAILGENIUS_DATA_DIR") or "var"
        self.commands = task_commands(self.data_dir)
        self.command = command or [sys.executable, "-m", "console"]
        self.state_path = state_path
        self.metrics = metrics or Metrics()
        self.state = self._load_state()
        self.stopping = asyncio.Event()
        self.current: asyncio.subprocess.Process | None = None
        for task in DEFAULT_SCHEDULES:
            self.metrics.failures.labels(task)  # every task's series exists from the start
            s = self.state["tasks"].get(task, {})
            if "last_success" in s:
                self.metrics.last_success.labels(task).set(s["last_success"])
            if "last_run" in s:
                self.metrics.last_run.labels(task).set(s["last_run"])
                self.metrics.last_ok.labels(task).set(1 if s.get("ok") else 0)
                self.metrics.duration.labels(task).set(s.get("duration", 0.0))
        backup = self.state["tasks"].get("backup", {}).get("last_success")
        self.metrics.backup_last_success.set(backup or self.state["created"])

    def _load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
            if isinstance(state, dict) and isinstance(state.get("tasks"), dict):
                state.setdefault("created", time.time())
                return state
        except (OSError, ValueError):
            pass
        state = {"created": time.time(), "tasks": {}}
        self._save(state)
        return state

    def _save(self, state: dict | None = None) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state or self.state, indent=1))
        tmp.replace(self.state_path)

    async def run_task(self, task: str) -> bool:
        """Run one task now; record its outcome and duration."""
        args = [a.replace("{date}", dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")) for a in self.commands[task]]
        if task.startswith("report-"):
            Path(args[-1]).parent.mkdir(parents=True, exist_ok=True)
        log.info("scheduled task %s starting", task, extra={"task": task})
        start_wall, start = time.time(), time.monotonic()
        ok, detail = False, ""
        try:
            proc = await asyncio.create_subprocess_exec(*self.command, *args, env=self.env,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                        start_new_session=True)
            self.current = proc
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), TASK_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = await proc.communicate()
                detail = f"timed out after {TASK_TIMEOUT:g} s; "
            finally:
                self.current = None
            ok = proc.returncode == 0
            detail += (out or b"").decode(errors="replace").strip()[-2000:]
        except OSError as exc:
            detail = str(exc)
        duration = time.monotonic() - start
        end = time.time()
        s = self.state["tasks"].setdefault(task, {})
        s.update({"last_run": end, "ok": ok, "duration": duration, "started": start_wall})
        self.metrics.last_run.labels(task).set(end)
        self.metrics.last_ok.labels(task).set(1 if ok else 0)
        self.metrics.duration.labels(task).set(duration)
        if ok:
            s["last_success"] = end
            self.metrics.last_success.labels(task).set(end)
            if task == "backup":
                self.metrics.backup_last_success.set(end)
            log.info("scheduled task %s succeeded in %.1f s: %s", task, duration, detail.splitlines()[-1:] or "",
                     extra={"task": task, "duration_seconds": round(duration, 3)})
        else:
            s["failures"] = s.get("failures", 0) + 1
            self.metrics.failures.labels(task).inc()
            log.error("scheduled task %s failed after %.1f s: %s", task, duration, detail,
                      extra={"task": task, "duration_seconds": round(duration, 3)})
        self._save()
        return ok

    async def _loop(self, task: str, schedule: Schedule) -> None:
        while not self.stopping.is_set():
            now = dt.datetime.now(dt.UTC)
            due = schedule.next_after(now)
            self.metrics.next_run.labels(task).set(due.timestamp())
            log.info("next %s at %s", task, due.isoformat(timespec="seconds"), extra={"task": task})
            # sleep in slices: a clock change or a suspended host does not skip a run by much
            while not self.stopping.is_set():
                left = (due - dt.datetime.now(dt.UTC)).total_seconds()
                if left <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), min(left, 60))
            if self.stopping.is_set():
                return
            async with self._one_at_a_time:
                if not self.stopping.is_set():
                    await self.run_task(task)

    async def run(self, port: int | None, host: str = "127.0.0.1") -> int:
        from prometheus_client import start_http_server

        self._one_at_a_time = asyncio.Lock()  # a backup and a VACUUM do not compete
        if port:
            start_http_server(port, addr=host, registry=self.metrics.registry)
            log.info("scheduler metrics on http://%s:%d/metrics", host, port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        active = {t: s for t, s in self.schedules.items() if s is not None}
        log.info("scheduler: %s", "; ".join(f"{t} {s.text!r}" for t, s in active.items()) or "every task is off")
        tasks = [asyncio.ensure_future(self._loop(t, s)) for t, s in active.items()]
        await self.stopping.wait()
        if self.current is not None and self.current.returncode is None:
            log.warning("stopping: the running task is interrupted")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.current.pid, signal.SIGTERM)
        await asyncio.wait(tasks, timeout=15) if tasks else None
        return 0

    def stop(self) -> None:
        self.stopping.set()


def cmd_scheduler(args) -> int:
    from mailgenius.logs import setup_logging

    from .stack import ops_env

    env = ops_env()
    setup_logging("scheduler", env.get("MAILGENIUS_LOG_LEVEL", "INFO"))
    try:
        schedules = load_schedules(env)
    except ScheduleError as exc:
        print(f"mailgenius scheduler: {exc}", file=sys.stderr)
        return 2
    if args.list:
        now = dt.datetime.now(dt.UTC)
        for task, s in schedules.items():
            print(f"{task:<16} {s.text if s else 'off':<14} next {s.next_after(now).isoformat(timespec='minutes') if s else '-'}")
        return 0
    data_dir = env.get("MAILGENIUS_DATA_DIR") or "var"
    sched = Scheduler(env, state_path=Path(data_dir) / "run" / "scheduler-state.json")
    if args.run_now:
        if args.run_now not in DEFAULT_SCHEDULES:
            print(f"mailgenius scheduler: no task {args.run_now!r} (one of {', '.join(DEFAULT_SCHEDULES)})", file=sys.stderr)
            return 2
        return 0 if asyncio.run(sched.run_task(args.run_now)) else 1
    raw = args.metrics_port or env.get("MAILGENIUS_SCHEDULER_METRICS_PORT") or DEFAULT_METRICS_PORT
    try:
        port = int(raw)
    except ValueError:
        print(f"mailgenius scheduler: MAILGENIUS_SCHEDULER_METRICS_PORT={raw!r} is not a port", file=sys.stderr)
        return 2
    try:
        return asyncio.run(sched.run(port, env.get("MAILGENIUS_HOST") or "127.0.0.1"))
    except OSError as exc:
        print(f"mailgenius scheduler: cannot serve metrics on port {port}: {exc} "
              "(set MAILGENIUS_SCHEDULER_METRICS_PORT)", file=sys.stderr)
        return 3
