"""The email provider failing (HTTP 500 on every call) for a sustained period mid-campaign:
the sender keeps retrying with back-off, the failures are visible on the worker's metrics while
it lasts, and once the provider is back the campaign completes: every lead mailed exactly once,
nothing failed.

"Several minutes" is scaled down to PROVIDER_OUTAGE seconds (default 15; env
MAILGENIUS_TEST_PROVIDER_OUTAGE), with the sender's retry budget scaled the same way
(MAILGENIUS_SENDER_BACKOFF_BASE=0.5, BACKOFF_MAX=4, MAX_ATTEMPTS=12: ~36 s of back-off > the
outage; the defaults give ~7.5 s, after which messages are marked failed for retry-failed).
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request

import aiohttp
import pytest

from tests.conftest import bearer
from tests.reliability.conftest import _stack_class

pytestmark = pytest.mark.slow

PROVIDER_OUTAGE = float(os.environ.get("MAILGENIUS_TEST_PROVIDER_OUTAGE", "15"))
N_LEADS = 500


def worker_provider_calls(stack) -> dict[str, float]:
    """mailgenius_provider_request_duration_seconds_count by (provider, operation) on the
    sender worker's metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.url("sender-worker") + "/", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "mailgenius_provider_request_duration_seconds_count":
                key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[key] = out.get(key, 0) + s.value
    return out


async def test_campaign_completes_after_a_sustained_provider_outage(settings, pool, make_key, tmp_path):
    from sender.testing import start_fake

    fake, runner, url = await start_fake(api_key="re_test")
    stack = _stack_class()(settings.replace(email_provider="resend", resend_base_url=url,
                                            resend_api_key="re_test"), tmp_path)
    try:
        key = await make_key("send", "read")
        stack.start_service("sender")
        stack.start_worker("sender", threads=2, MAILGENIUS_SENDER_BACKOFF_BASE="0.5",
                           MAILGENIUS_SENDER_BACKOFF_MAX="4", MAILGENIUS_SENDER_MAX_ATTEMPTS="12",
                           MAILGENIUS_LOG_LEVEL="warning")
        await pool.execute("""INSERT INTO leads (email, tags) SELECT 'p' || g || '@example.com', '{prov}'
                              FROM generate_series(1, $1) g""", N_LEADS)
        # Given a provider that answers 500 to every call for the whole outage
        fake.script = [{"status": 500, "message": "provider outage"}] * 100_000
        outage_start = time.monotonic()
        async with aiohttp.ClientSession() as s:
            h = bearer(key)
            r = await s.post(stack.url("sender") + "/api/campaigns", headers=h, json={
                "name": "provider outage", "subject": "Hi", "from_email": "news@example.com",
                "html": "<p>Hello</p>", "text": "Hello", "segment": {"tags": ["prov"]}})
            assert r.status == 201, await r.text()
            cid = (await r.json())["id"]
            assert (await s.post(stack.url("sender") + f"/api/campaigns/{cid}/send", headers=h)).status == 202
            # When it lasts: the sender retries (calls keep coming, spaced by back-off)...
            while time.monotonic() - outage_start < PROVIDER_OUTAGE:
                await asyncio.sleep(1)
            refused = fake.stats()["statuses"].get(500, 0)
            assert refused >= 5, f"the sender did not keep retrying: {fake.stats()}"
            c = await (await s.get(stack.url("sender") + f"/api/campaigns/{cid}", headers=h)).json()
            assert c["sent"] == 0 and c["status"] == "sending", c
            # ...and the worker's metrics show the failing provider calls while it lasts
            calls = worker_provider_calls(stack)
            assert sum(calls.values()) >= refused, (calls, refused)
            # Then once the provider is back, the campaign completes: all sent, exactly once
            fake.script.clear()
            end = time.monotonic() + 90
            while True:
                c = await (await s.get(stack.url("sender") + f"/api/campaigns/{cid}", headers=h)).json()
                if c["status"] in ("sent", "failed", "cancelled"):
                    break
                assert time.monotonic() < end, f"campaign stuck after recovery: {c}\n{stack.log('sender-worker')}"
                await asyncio.sleep(0.5)
        st = fake.stats()
        assert c["status"] == "sent" and c["sent"] == N_LEADS and c["failed"] == 0, c
        assert st["unique_recipients"] == N_LEADS and st["duplicates"] == 0, st
    finally:
        stack.stop("sender-worker", kill=True)
        stack.stop_all()
        await runner.cleanup()
