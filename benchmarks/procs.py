"""What the benchmarks that start the stack's processes share: free ports, starting a process
in its own session with its output in a log, stopping it, waiting for an HTTP endpoint, and the
CPU seconds of a process and its children (Linux ``/proc``).

The benchmarks run as scripts (``python benchmarks/NAME.py``) with the repository root put first
on ``sys.path``, so they import this as ``benchmarks.procs``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg

from mailgenius.db import with_database

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, env, log):
    """Start ``argv`` in the repository root, in a session of its own (so :func:`stop` can kill
    its whole process group), stdout and stderr to ``log``."""
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            start_new_session=True)


def stop(proc, timeout: float = 15.0):
    """SIGTERM to the process (a dramatiq main process relays it to its workers, exactly once);
    its whole group is killed when it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


async def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until ``url`` answers below 500; RuntimeError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (every process's parent read from /proc, so children started by
    any of a process's threads count)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """user + system CPU of one process, 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its descendants."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


def cancel_on_signals() -> None:
    """SIGTERM / SIGINT (even when started in the background, where SIGINT is ignored) cancel
    the running task, so the benchmark's ``finally`` stops its processes and drops its database."""
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)


async def create_scratch_database(database_url: str) -> tuple[str, str, str]:
    """A new database ``mailgenius_bench_<random>`` beside ``database_url``'s: (its name, the
    admin URL that drops it with :func:`drop_database`, its URL)."""
    name = f"mailgenius_bench_{uuid.uuid4().hex[:8]}"
    admin_url = with_database(database_url, "postgres")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, admin_url, with_database(database_url, name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop a scratch database, its sessions included."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
