"""Sender fixtures: the API app on test settings wired to a local fake Resend, an in-process
send context with its own registry, lead factories, and real `mailgenius worker sender`
subprocesses (killed in teardown)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from mailgenius.cache import create_redis
from sender import campaigns
from sender.app import create_app
from sender.metrics import SenderMetrics
from sender.sending import SendContext, send_campaign_batch
from sender.testing import start_fake
from tests.conftest import ROOT, bearer, free_port

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"mailgenius-test-webhook-secret!!").decode()
TRACKING_SECRET = "test-tracking-secret"
PUBLIC_URL = "http://mail.example.test"


@pytest.fixture
async def fake_resend():
    fake, runner, url = await start_fake(api_key="re_test")
    fake.url = url
    yield fake
    await runner.cleanup()


@pytest.fixture
def ssettings(settings, fake_resend):
    return settings.replace(email_provider="resend", resend_base_url=fake_resend.url, resend_api_key="re_test",
                            resend_webhook_secret=WEBHOOK_SECRET, tracking_secret=TRACKING_SECRET,
                            public_url=PUBLIC_URL)


@pytest.fixture
async def api(aiohttp_client, ssettings, pool, make_key):
    """An aiohttp test client of the sender app; .h = headers of a send+admin key."""
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(ssettings, registry=registry))
    client.registry = registry
    client.h = bearer(await make_key("send", "admin"))
    client.read_h = bearer(await make_key("read"))
    return client


@pytest.fixture
async def redis_client(ssettings):
    r = create_redis(ssettings.redis_url)
    yield r
    await r.aclose()


@pytest.fixture
async def send_ctx(pool, redis_client, ssettings):
    """The send path in-process (as a worker would run it) with an injected registry."""
    registry = CollectorRegistry()
    ctx = await SendContext(pool, redis_client, ssettings, SenderMetrics(registry)).start()
    ctx.registry = registry
    yield ctx
    await ctx.close()


async def add_leads(pool, n: int, *, tags=(), status="active", prefix="lead") -> list[int]:
    rows = await pool.fetch(
        """INSERT INTO leads (email, first_name, tags, status)
           SELECT $3 || '-' || g || '-' || substr(md5(random()::text), 1, 6) || '@example.com',
                  'Name' || g, $1::text[], $2
           FROM generate_series(1, $4) g RETURNING id""", list(tags), status, prefix, n)
    return [r["id"] for r in rows]


async def make_campaign(api, **over) -> int:
    body = {"name": "c", "subject": "Hello {{ first_name }}", "from_email": "News <news@example.com>",
            "html": '<html><body><p>Hi {{ first_name }}</p><a href="https://shop.example.com/sale">Sale</a></body></html>',
            "text": "Hi {{ first_name }}", "segment": {"tags": []}}
    body.update(over)
    resp = await api.post("/api/campaigns", json=body, headers=api.h)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def drain(ctx, pool, cid: int) -> None:
    """Write the ledger and send every open batch in-process (no dramatiq)."""
    await campaigns.write_ledger(pool, cid)
    for b in await campaigns.open_batches(pool, cid):
        await send_campaign_batch(ctx, cid, b)


async def campaign(pool, cid: int) -> dict:
    return dict(await pool.fetchrow("SELECT * FROM campaigns WHERE id = $1", cid))


def worker_env(settings, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url, "BROKER_URL": settings.broker_url,
        "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix, "MAILGENIUS_EMAIL_PROVIDER": settings.email_provider,
        "MAILGENIUS_RESEND_BASE_URL": settings.resend_base_url, "RESEND_API_KEY": settings.resend_api_key,
        "MAILGENIUS_TRACKING_SECRET": settings.tracking_secret, "MAILGENIUS_PUBLIC_URL": settings.public_url,
        "MAILGENIUS_SMTP_HOST": settings.smtp_host, "MAILGENIUS_SMTP_PORT": str(settings.smtp_port),
        "MAILGENIUS_DATA_DIR": settings.data_dir, "MAILGENIUS_LOG_LEVEL": "warning",
        "MAILGENIUS_SENDER_BACKOFF_BASE": "0.2",
        "MAILGENIUS_BROKER_MAINTENANCE_CHANCE": "1000000",
        "MAILGENIUS_BROKER_HEARTBEAT_TIMEOUT_MS": "4000",
    })
    env.update(extra)
    return env


class Workers:
    def __init__(self, settings, tmp_path):
        self.settings = settings
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, *, processes: int = 1, threads: int = 4, **extra) -> subprocess.Popen:
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")
        port = free_port()
        data_dir = str(self.tmp_path / f"worker-{len(self.procs)}-data")
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/mailgenius"), "worker", "sender", "--processes", str(processes),
             "--threads", str(threads), "--metrics-port", str(port)],
            env=worker_env(self.settings, MAILGENIUS_DATA_DIR=data_dir, **extra), stdout=log,
            stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
        proc.metrics_port = port
        self.procs.append(proc)
        return proc

    def kill9(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    # one SIGTERM to dramatiq's main process, which relays it to its workers (a
                    # second one from a group-wide signal makes them hang on their threads)
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(timeout=5)

    def logs(self) -> str:
        out = []
        for f in sorted(self.tmp_path.glob("worker-*.log")):
            out.append(f.read_text(errors="replace")[-3000:])
        return "\n".join(out)


@pytest.fixture
def workers(ssettings, tmp_path):
    # messages left by in-process tests (ids restart with every truncate) must not reach them
    import redis as syncredis

    from mailgenius.broker import dramatiq_namespace

    client = syncredis.Redis.from_url(ssettings.redis_url)
    for key in client.scan_iter(match=f"{dramatiq_namespace(ssettings)}*", count=1000):
        client.delete(key)
    client.close()
    w = Workers(ssettings, tmp_path)
    yield w
    w.stop_all()


async def wait_for(pred, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


__all__ = ["add_leads", "make_campaign", "drain", "campaign", "wait_for", "sys"]
