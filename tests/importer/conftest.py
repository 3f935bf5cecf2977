"""Importer test fixtures: the API app on test settings, an import-scoped key, an in-process
job runner with its own metrics registry, and a real `mailgenius worker importer` subprocess."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from importer.app import create_app
from importer.loader import ImportMetrics, ImportOptions, run_import
from mailgenius.cache import create_redis
from tests.conftest import ROOT, bearer, free_port

FIXTURES = Path(__file__).with_name("fixtures")


@pytest.fixture
async def api(aiohttp_client, settings, pool, make_key):
    """(client, registry, headers) for an importer app on the test settings."""
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(settings, registry=registry))
    key = await make_key("import")
    client.registry = registry
    client.headers_ = bearer(key)
    return client


@pytest.fixture
async def job_runner(pool, settings):
    """Run an import in-process (as the actor would) with an injected registry."""
    redis = create_redis(settings.redis_url)
    registry = CollectorRegistry()
    metrics = ImportMetrics(registry)

    async def run(import_id: int, **opts) -> str:
        return await run_import(pool, redis, settings, import_id, metrics=metrics,
                                options=ImportOptions(**opts))

    run.registry = registry
    yield run
    await redis.aclose()


async def upload(client, path_or_bytes, *, filename="leads.csv", **fields) -> aiohttp.ClientResponse:
    data = aiohttp.FormData()
    for k, v in fields.items():
        data.add_field(k, v)
    body = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    data.add_field("file", io.BytesIO(body), filename=filename, content_type="text/csv")
    return await client.post("/api/upload", data=data, headers=client.headers_)


def worker_env(settings, metrics_port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "BROKER_URL": settings.broker_url,
        "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix,
        "MAILGENIUS_DATA_DIR": settings.data_dir,
        "MAILGENIUS_UPLOAD_DIR": settings.upload_dir,
        "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT": str(metrics_port),
        "MAILGENIUS_LOG_LEVEL": "warning",
        # redeliver a killed worker's message within seconds, not minutes
        "MAILGENIUS_BROKER_MAINTENANCE_CHANCE": "1000000",
        "MAILGENIUS_BROKER_HEARTBEAT_TIMEOUT_MS": "3000",
    })
    env.update(extra)
    return env


class Worker:
    """A real `mailgenius worker importer` process group."""

    def __init__(self, settings, **extra: str):
        self.metrics_port = free_port()
        self.log_path = Path(settings.data_dir) / f"worker-{self.metrics_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mailgenius")), "worker", "importer", "--processes", "1",
             "--threads", "2", "--metrics-port", str(self.metrics_port)],
            cwd=ROOT, env=worker_env(settings, self.metrics_port, **extra),
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=4)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill9()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture
def start_worker(settings):
    """Start real workers on an empty lead-import queue (messages left by API-only tests would
    point at truncated imports)."""
    import redis

    from mailgenius.broker import dramatiq_namespace

    client = redis.Redis.from_url(settings.redis_url)
    for key in client.scan_iter(match=f"{dramatiq_namespace(settings)}*", count=1000):
        client.delete(key)
    client.close()
    workers: list[Worker] = []

    def start(**extra: str) -> Worker:
        w = Worker(settings, **extra)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


async def wait_status(pool, import_id: int, statuses=("completed", "failed", "cancelled"),
                      timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", import_id)
        if row is not None and row["status"] in statuses:
            return dict(row)
        import asyncio

        await asyncio.sleep(0.1)
    raise AssertionError(f"import {import_id} did not reach {statuses} in {timeout}s: {dict(row) if row else None}")
