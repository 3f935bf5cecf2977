"""The process supervisor of ``make run`` (scripts/run.sh): one line of the Procfile per process.

What it guarantees (issue 20):

- Every process runs in its own session (so its own process group); one process dying never
  stops the others. A process that exits while the stack is running is restarted after a
  backoff that doubles from ``MAILGENIUS_RESTART_BACKOFF_MIN`` (1 s) up to
  ``MAILGENIUS_RESTART_BACKOFF_MAX`` (30 s), and reset once it has run 60 s; every exit and
  restart is logged.
- Leftovers of a process (children still in its process group after the leader exited) are
  killed before it is restarted, so a restarted process finds its port free.
- A dramatiq worker group (``mailgenius worker ...``) is one supervised process: when one of its
  worker processes dies, dramatiq's main process stops the others gracefully and exits, and the
  supervisor starts the whole group again, so the group always comes back to its configured
  number of processes.
- Ctrl-C (SIGINT) or SIGTERM: one SIGTERM to each process (only the leader: dramatiq treats a
  second SIGTERM as "kill now"), then, after ``MAILGENIUS_STOP_TIMEOUT`` seconds at most,
  SIGKILL to every process group and every process below the supervisor, orphans included (the
  supervisor is a child subreaper, so orphans are re-parented to it, not to init).
- Each process's output goes to the terminal (prefixed with its name) and, as JSON lines, to
  ``<log dir>/<process>.log`` with size-based rotation (lines that are not JSON already are
  wrapped in an object with ts, level, service, message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import json
import logging
import logging.handlers
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

#: prctl option making this process the reaper of its orphaned descendants
PR_SET_CHILD_SUBREAPER = 36
#: a process that ran this long before exiting restarts after the minimal backoff again
BACKOFF_RESET_AFTER = 60.0
#: rotation of the per-process log files
LOG_MAX_BYTES = 10 * 2**20
LOG_BACKUPS = 5

_LINE = re.compile(r"^([A-Za-z0-9_.-]+):\s*(.+)$")


def parse_procfile(text: str) -> dict[str, str]:
    """``name: command`` lines; blank lines and ``#`` comments ignored."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"Procfile line {number}: expected 'name: command', got {raw!r}")
        if m.group(1) in out:
            raise ValueError(f"Procfile line {number}: process {m.group(1)!r} defined twice")
        out[m.group(1)] = m.group(2)
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def json_line(service: str, line: str, level: str = "info") -> str:
    """``line`` as one JSON object: kept when it already is one, else wrapped."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            obj.setdefault("service", service)
            obj.setdefault("ts", _now())
            obj.setdefault("level", level)
            return json.dumps(obj, ensure_ascii=False)
    lowered = text.lower()
    if level == "info":
        # logfmt (Prometheus, the exporters), dramatiq's "[PID ...] [logger] [LEVEL]", "ERROR: ..."
        for word in ("critical", "fatal", "error", "warn"):
            if f"level={word}" in lowered or f"[{word}" in lowered or lowered.startswith(f"{word}"):
                level = "warning" if word == "warn" else ("critical" if word in ("critical", "fatal") else "error")
                break
    return json.dumps({"ts": _now(), "level": level, "service": service, "message": text}, ensure_ascii=False)


def file_logger(log_dir: Path, name: str) -> logging.Logger:
    """A logger writing raw lines to ``<log_dir>/<name>.log`` with size-based rotation."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"mailgenius.supervisor.file.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler = logging.handlers.RotatingFileHandler(log_dir / f"{name}.log", maxBytes=LOG_MAX_BYTES,
                                                   backupCount=LOG_BACKUPS, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


@dataclass
class Proc:
    name: str
    command: str
    pid: int | None = None
    starts: int = 0
    backoff: float = 0.0
    started_at: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, procs: dict[str, str], *, env: dict[str, str], cwd: Path, log_dir: Path,
                 stop_timeout: float = 20.0, backoff_min: float = 1.0, backoff_max: float = 30.0,
                 out=None, state_file: Path | None = None):
        self.procs = {name: Proc(name, cmd) for name, cmd in procs.items()}
        self.env = env
        self.cwd = cwd
        self.log_dir = log_dir
        self.stop_timeout = stop_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.out = out or sys.stdout
        self.stopping = asyncio.Event()
        self.width = max([len(n) for n in self.procs] + [len("supervisor")])
        self.files = {name: file_logger(log_dir, name) for name in [*self.procs, "supervisor"]}
        self.leaders: set[int] = set()
        self.spawn_lock = asyncio.Lock()
        self.state_file = state_file
        self.exits: dict[str, dict] = {}

    def write_state(self) -> None:
        """``supervisor.json``: each process's pid, starts and last exit (for operators and tests)."""
        if self.state_file is None:
            return
        state = {"supervisor": os.getpid(), "stopping": self.stopping.is_set(), "processes": {
            p.name: {"pid": p.pid, "starts": p.starts, **self.exits.get(p.name, {})} for p in self.procs.values()}}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with contextlib.suppress(OSError):
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.state_file)

    # -- output -----------------------------------------------------------------------------

    def emit(self, name: str, line: str, level: str = "info") -> None:
        stamp = time.strftime("%H:%M:%S")
        try:
            self.out.write(f"{stamp} {name:<{self.width}} | {line.rstrip()}\n")
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away: the files still get everything
            pass
        self.files[name].info(json_line(name, line, level))

    def say(self, message: str, level: str = "info") -> None:
        self.emit("supervisor", message, level)

    async def _pump(self, proc: Proc, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: take what is there
                line = await stream.read(65536)
            if not line:
                return
            self.emit(proc.name, line.decode("utf-8", errors="replace"))

    # -- one process ------------------------------------------------------------------------

    async def run_one(self, proc: Proc) -> None:
        while not self.stopping.is_set():
            proc.exited.clear()
            loop = asyncio.get_running_loop()
            read_fd, write_fd = os.pipe()
            child = transport = None
            await self.spawn_lock.acquire()  # no orphan hunt while a new leader is not yet known
            try:
                # our own pipe, not asyncio's: Process.wait() would wait for every holder of
                # asyncio's pipes to close, i.e. for the leftovers we want to kill once it returns
                child = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", proc.command, cwd=self.cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=write_fd, stderr=write_fd, start_new_session=True)
            except OSError as exc:
                self.say(f"{proc.name}: cannot start: {exc}", "error")
                rc = None
                os.close(read_fd)
            finally:
                os.close(write_fd)
                if child is not None:
                    self.leaders.add(child.pid)
                self.spawn_lock.release()
            if child is not None:
                proc.pid, proc.started_at = child.pid, time.monotonic()
                proc.starts += 1
                self.write_state()
                if self.stopping.is_set():  # started while stop_all was sending its SIGTERMs
                    _signal(child.pid, signal.SIGTERM)
                if proc.starts > 1:
                    self.say(f"{proc.name} restarted (pid {child.pid}, start #{proc.starts})", "warning")
                reader = asyncio.StreamReader(limit=2**20)
                transport, _ = await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r),
                                                            os.fdopen(read_fd, "rb", 0))
                pump = asyncio.ensure_future(self._pump(proc, reader))
                rc = await child.wait()
                # leftovers of its process group (forks, a worker group's children) go with it,
                # and so do orphans re-parented to us (they left their group: setsid, daemons)
                _signal(child.pid, signal.SIGKILL, group=True)
                self.leaders.discard(child.pid)
                async with self.spawn_lock:
                    self._kill_orphans()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pump, 5)
                transport.close()
                proc.pid = None
                self.exits[proc.name] = {"last_exit": rc, "last_exit_at": time.time()}
                self.write_state()
            proc.exited.set()
            if self.stopping.is_set():
                return
            ran = time.monotonic() - proc.started_at if child is not None else 0.0
            if ran >= BACKOFF_RESET_AFTER or proc.backoff == 0:
                proc.backoff = self.backoff_min
            else:
                proc.backoff = min(self.backoff_max, proc.backoff * 2)
            how = f"was killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exited with code {rc}"
            self.say(f"{proc.name} {how} after {ran:.1f} s; restarting in {proc.backoff:g} s", "error")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), proc.backoff)

    # -- the whole stack --------------------------------------------------------------------

    def _reap_orphans(self) -> None:
        """Wait for orphans re-parented to us (never for our own children: asyncio does)."""
        me = os.getpid()
        for pid in descendants(me):
            stat = _proc_stat(pid)
            if stat and stat[0] == me and stat[1] == "Z" and pid not in self.leaders:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def _kill_orphans(self) -> None:
        """SIGKILL every child of ours that is not a supervised process: an orphan of the stack."""
        me = os.getpid()
        for pid in descendants(me):
            stat = _proc_stat(pid)
            if stat and stat[0] == me and stat[1] != "Z" and pid not in self.leaders:
                _signal(pid, signal.SIGKILL, group=True)
                _signal(pid, signal.SIGKILL)
        self._reap_orphans()

    async def _reaper(self) -> None:
        while not self.stopping.is_set():
            self._reap_orphans()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 2)

    def request_stop(self, signame: str) -> None:
        if not self.stopping.is_set():
            self.say(f"{signame} received: stopping every process (at most {self.stop_timeout:g} s)")
            self.stopping.set()

    async def stop_all(self, tasks: list[asyncio.Task]) -> None:
        running = [p for p in self.procs.values() if p.pid]
        for p in running:  # one SIGTERM each, to the leader only
            _signal(p.pid, signal.SIGTERM)
        waits = [asyncio.ensure_future(p.exited.wait()) for p in running]
        if waits:
            done, pending = await asyncio.wait(waits, timeout=self.stop_timeout)
            for w in pending:
                w.cancel()
        late = [p.name for p in running if not p.exited.is_set()]
        if late:
            self.say(f"still running after {self.stop_timeout:g} s, killing: {', '.join(late)}", "warning")
        for p in self.procs.values():
            if p.pid:
                _signal(p.pid, signal.SIGKILL, group=True)
        for pid in descendants(os.getpid()):  # orphans that left their group
            _signal(pid, signal.SIGKILL)
        await asyncio.wait(tasks, timeout=10)
        for pid in descendants(os.getpid()):
            _signal(pid, signal.SIGKILL)
        self._reap_orphans()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        if become_subreaper():
            self.say("child subreaper: orphans of the stack stay under the supervisor")
        self.say(f"starting {len(self.procs)} processes: {', '.join(self.procs)}; logs in {self.log_dir}")
        tasks = [asyncio.ensure_future(self.run_one(p)) for p in self.procs.values()]
        reaper = asyncio.ensure_future(self._reaper())
        await self.stopping.wait()
        started = time.monotonic()
        await self.stop_all(tasks)
        reaper.cancel()
        self.write_state()
        self.say(f"every process stopped in {time.monotonic() - started:.1f} s")
        return 0


def _float_env(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"supervisor: {name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SystemExit(f"supervisor: {name} must be above 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m console.supervisor", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-f", "--procfile", default="Procfile", help="processes to run (name: command)")
    parser.add_argument("-e", "--env-file", default=None, help="KEY=value file added to the environment")
    parser.add_argument("--log-dir", default=None, help="where <process>.log files go (default: <data dir>/log)")
    parser.add_argument("--state-file", default=None,
                        help="where each process's pid and restarts are kept (default: <data dir>/run/supervisor.json)")
    parser.add_argument("--only", default=None, help="comma-separated process names to run (default: all)")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.env_file:
        from .stack import read_env_file

        env.update(read_env_file(Path(args.env_file)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    procfile = Path(args.procfile)
    try:
        procs = parse_procfile(procfile.read_text())
    except (OSError, ValueError) as exc:
        print(f"supervisor: {exc}", file=sys.stderr)
        return 2
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in procs]
        if unknown:
            print(f"supervisor: not in {procfile}: {', '.join(unknown)}", file=sys.stderr)
            return 2
        procs = {n: procs[n] for n in wanted}
    data_dir = env.get("MAILGENIUS_DATA_DIR") or "var"
    log_dir = Path(args.log_dir or os.path.join(data_dir, "log"))
    state_file = Path(args.state_file or os.path.join(data_dir, "run", "supervisor.json"))
    sup = Supervisor(procs, env=env, cwd=procfile.resolve().parent, log_dir=log_dir,
                     stop_timeout=_float_env(env, "MAILGENIUS_STOP_TIMEOUT", 20.0),
                     backoff_min=_float_env(env, "MAILGENIUS_RESTART_BACKOFF_MIN", 1.0),
                     backoff_max=_float_env(env, "MAILGENIUS_RESTART_BACKOFF_MAX", 30.0), state_file=state_file)
    return asyncio.run(sup.run())


if __name__ == "__main__":
    sys.exit(main())
