"""What the sender's outage suites share (tests/reliability/test_provider_outage.py,
test_smtp_outage.py, test_smtp_kill.py): the sender API and its worker started as real
subprocesses, a campaign sent through the API, and polling for an outcome.

* :func:`sender_stack`: the stack with ``mailgenius serve sender`` and one
  ``mailgenius worker sender`` process; the worker is killed (-9) and the stack stopped on exit,
  whatever happened (a test may have killed or replaced the worker meanwhile);
* :func:`add_leads`, :func:`send_campaign`: leads tagged ``tag``, then a campaign to that
  segment created and sent with an API key's headers;
* :func:`poll`: wait for an async predicate, failing with what was awaited (and, by the callers'
  habit, the worker's log);
* :data:`WORKER_ENV`, :func:`start_campaign`, :func:`finished`: the SMTP suites' worker
  environment, campaign start (provider switched to SMTP) and end condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp

from tests.conftest import bearer
from tests.reliability.conftest import _stack_class

#: leads of an SMTP suite's campaign
N_LEADS = 2000
#: the SMTP suites' worker: quick retries, warnings only, quick stall recovery
WORKER_ENV = {"MAILGENIUS_SENDER_BACKOFF_BASE": "0.2", "MAILGENIUS_LOG_LEVEL": "warning",
              "MAILGENIUS_BROKER_MAINTENANCE_CHANCE": "1000000",
              "MAILGENIUS_BROKER_HEARTBEAT_TIMEOUT_MS": "3000",
              "MAILGENIUS_SENDER_STALL_SECONDS": "8", "MAILGENIUS_SENDER_SWEEP_INTERVAL": "2"}


@contextlib.contextmanager
def sender_stack(settings, tmp_path, *, threads: int, **worker_env: str):
    """A real stack (tests/stack.py) on ``settings`` running the sender API and one worker process
    with ``threads`` threads and ``worker_env``."""
    stack = _stack_class()(settings, tmp_path)
    try:
        stack.start_service("sender")
        stack.start_worker("sender", threads=threads, **worker_env)
        yield stack
    finally:
        stack.stop("sender-worker", kill=True)
        stack.stop_all()


async def poll(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(interval)


async def add_leads(pool, n: int, tag: str, prefix: str) -> None:
    await pool.execute("""INSERT INTO leads (email, tags) SELECT $2::text || g || '@example.com', ARRAY[$3::text]
                          FROM generate_series(1, $1) g""", n, prefix, tag)


async def send_campaign(stack, session: aiohttp.ClientSession, headers: dict, name: str, tag: str) -> int:
    """Create a campaign to the leads tagged ``tag`` and send it; returns its id."""
    r = await session.post(stack.url("sender") + "/api/campaigns", headers=headers, json={
        "name": name, "subject": "Hi", "from_email": "news@example.com",
        "html": "<p>Hello</p>", "text": "Hello", "segment": {"tags": [tag]}})
    assert r.status == 201, await r.text()
    cid = (await r.json())["id"]
    assert (await session.post(stack.url("sender") + f"/api/campaigns/{cid}/send", headers=headers)).status == 202
    return cid


async def start_campaign(stack, pool, make_key, tag: str) -> int:
    """N_LEADS leads tagged ``tag``, the provider switched to SMTP, and a campaign to them sent."""
    await add_leads(pool, N_LEADS, tag, tag)
    key = await make_key("send", "read", "admin")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        h = bearer(key)
        r = await s.put(stack.url("sender") + "/api/settings/email", headers=h,
                        json={"provider": "smtp", "rate_limit": 0})
        assert r.status == 200, await r.text()
        return await send_campaign(stack, s, h, "pg outage", tag)


async def finished(pool, cid: int):
    row = await pool.fetchrow("SELECT status, sent, failed, queued FROM campaigns WHERE id = $1", cid)
    return dict(row) if row["status"] in ("sent", "failed", "cancelled") else None
