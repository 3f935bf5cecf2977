"""``process_*`` and ``python_*`` metrics for every Python process, the dramatiq workers included.

The HTTP services register prometheus_client's process, platform and GC collectors on their own
registry (:func:`service_registry`). The dramatiq workers run in multiprocess mode: their
counters live in files that dramatiq's exposition process (a fork of the master) aggregates, and
prometheus_client's ProcessCollector can only describe the process it runs in. So the workers
expose through :class:`WorkerPrometheus`, dramatiq's middleware with an exposition that adds
:class:`WorkerProcessCollector`: ``process_*`` of the master and of each worker process it
forked, one series per process, labelled ``pid`` (sum them for the group's memory and CPU).

``_created`` series are turned off for every process (they double the series of every counter
and histogram and nothing reads them).
"""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import Metric

from . import metrics  # noqa: F401  (turns _created series off for this process)


def service_registry() -> CollectorRegistry:
    """A registry for one HTTP service process: process_* (memory, CPU, fds, start time),
    python_info and python_gc_*."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command may contain spaces and parentheses: fields after the last ")"
    return int(stat.rsplit(b")", 1)[1].split()[1])


def worker_pids(master: int) -> list[int]:
    """The dramatiq master and the processes it forked (worker processes, forks), sorted."""
    pids = [master]
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for name in entries:
        if name.isdigit() and int(name) != master and _ppid(int(name)) == master:
            pids.append(int(name))
    return sorted(pids)


class WorkerProcessCollector:
    """process_* of every process of a dramatiq worker group, labelled pid."""

    def __init__(self, master: int):
        self.master = master

    def collect(self):
        families: dict[str, Metric] = {}
        for pid in worker_pids(self.master):
            for fam in ProcessCollector(pid=lambda p=pid: p, registry=None).collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation + " (per process)", fam.type)
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        yield from families.values()


def _exposition(master: int) -> bytes:
    import prometheus_client as prom
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(WorkerProcessCollector(master))
    PlatformCollector(registry=registry)
    return prom.generate_latest(registry)


def _run_exposition_server() -> int:
    """dramatiq fork: serve the multiprocess metrics plus every worker process's process_*."""
    from dramatiq.middleware import prometheus as dp

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = dp.DB_PATH
    os.environ["prometheus_multiproc_dir"] = dp.DB_PATH
    master = os.getppid()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            from prometheus_client import CONTENT_TYPE_LATEST

            output = _exposition(master)
            self.send_response(200)
            self.send_header("content-type", CONTENT_TYPE_LATEST)
            self.end_headers()
            self.wfile.write(output)

        def log_message(self, fmt, *args):
            pass

    httpd = HTTPServer((dp.HTTP_HOST, dp.HTTP_PORT), Handler)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        httpd.shutdown()
    return 0


def worker_middleware():
    """dramatiq's Prometheus middleware whose exposition also has the processes' process_*."""
    from dramatiq.middleware.prometheus import Prometheus

    class WorkerPrometheus(Prometheus):
        @property
        def forks(self):
            return [_run_exposition_server]

    return WorkerPrometheus()
