"""End to end through dramatiq: the API enqueues, real `mailgenius worker sender` subprocesses
send to the fake Resend. Exactly once under kill -9, pause/resume/cancel, the shared rate limit."""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import add_leads, campaign, make_campaign, wait_for

pytestmark = pytest.mark.slow


async def _status(pool, cid):
    return await campaign(pool, cid)


async def test_exactly_once_when_a_worker_is_killed_mid_batch(api, pool, fake_resend, workers):
    # Given 1,000 recipients and a provider that takes 0.4 s per call
    await add_leads(pool, 1000)
    fake_resend.delay = 0.4
    cid = await make_campaign(api)
    w1 = workers.start(threads=3)
    assert (await api.post(f"/api/campaigns/{cid}/send", headers=api.h)).status == 202
    # When the worker is killed with -9 while provider calls are in flight
    await wait_for(lambda: _ready(fake_resend), 30, 0.02, "calls in flight")
    workers.kill9(w1)
    emails_at_kill = fake_resend.emails
    await asyncio.sleep(0.6)  # the in-flight calls complete on the provider side
    stuck = await pool.fetchval("SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'sending'", cid)
    assert stuck > 0, "the kill should leave claimed rows behind"
    # Then a new worker finishes the campaign and nobody got the email twice
    fake_resend.delay = 0.05
    workers.start(threads=3)

    async def done():
        return (await campaign(pool, cid))["status"] == "sent"

    await wait_for(done, 60, 0.2, "the campaign to finish after the crash\n" + workers.logs())
    st = fake_resend.stats()
    assert st["unique_recipients"] == 1000 and st["duplicates"] == 0, st
    assert st["replays"] >= 1, st  # the crashed calls were retried with the same idempotency key
    assert emails_at_kill < 1000
    c = await campaign(pool, cid)
    assert (c["sent"], c["queued"], c["failed"], c["recipients"]) == (1000, 0, 0, 1000)
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'sent'", cid) == 1000


async def _ready(fake):
    return fake.calls >= 2 and fake.in_flight >= 1


async def test_pause_resume_cancel_through_the_queue(api, pool, fake_resend, workers):
    await add_leads(pool, 3000)
    fake_resend.delay = 0.05
    cid = await make_campaign(api)
    w = workers.start(threads=2)
    await api.post(f"/api/campaigns/{cid}/send", headers=api.h)

    async def sent_some():
        return (await campaign(pool, cid))["sent"] >= 300

    await wait_for(sent_some, 30, 0.05, "first batches")
    # When paused, Then sending stops within seconds
    assert (await api.post(f"/api/campaigns/{cid}/pause", headers=api.h)).status == 200
    await asyncio.sleep(1.0)
    frozen = fake_resend.emails
    await asyncio.sleep(1.5)
    assert fake_resend.emails == frozen < 3000
    assert (await campaign(pool, cid))["sent"] == frozen
    # When resumed, Then the rest is sent and nobody twice
    assert (await api.post(f"/api/campaigns/{cid}/resume", headers=api.h)).status == 200

    async def finished():
        return (await campaign(pool, cid))["status"] == "sent"

    await wait_for(finished, 60, 0.2, "resume to finish\n" + workers.logs())
    st = fake_resend.stats()
    assert st["unique_recipients"] == 3000 and st["duplicates"] == 0
    # the worker's metrics (multiprocess mode) are served on its dramatiq Prometheus port
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{w.metrics_port}/metrics") as r:
        text = await r.text()
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(text) for x in fam.samples}
    assert samples[("mailgenius_emails_sent_total", (("provider", "resend"),))] == 3000
    assert samples[("mailgenius_campaigns_finished_total", (("outcome", "sent"),))] == 1
    assert samples[("mailgenius_provider_request_duration_seconds_count",
                    (("operation", "send_batch"), ("provider", "resend")))] >= 30
    # Cancel: a second campaign to the same leads stops within seconds, counts exact
    fake_resend.reset()
    cid2 = await make_campaign(api)
    await api.post(f"/api/campaigns/{cid2}/send", headers=api.h)

    async def started():
        return (await campaign(pool, cid2))["sent"] >= 200

    await wait_for(started, 30, 0.05, "second campaign to start")
    resp = await api.post(f"/api/campaigns/{cid2}/cancel", headers=api.h)
    assert resp.status == 200
    await asyncio.sleep(1.0)
    frozen = fake_resend.emails
    await asyncio.sleep(1.0)
    assert fake_resend.emails == frozen < 3000
    c = await campaign(pool, cid2)
    cancelled = await pool.fetchval("SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'cancelled'", cid2)
    assert c["status"] == "cancelled" and c["queued"] == 0
    assert c["sent"] + cancelled == 3000 and c["sent"] == frozen


async def test_rate_limit_applies_to_running_workers_without_restart(api, pool, fake_resend, workers):
    # Given a rate limit of 100 emails/s and two worker processes
    await add_leads(pool, 2000)
    assert (await api.put("/api/settings/email", json={"rate_limit": 100}, headers=api.h)).status == 200
    workers.start(processes=2, threads=2)
    cid = await make_campaign(api)
    await api.post(f"/api/campaigns/{cid}/send", headers=api.h)

    async def some():
        return fake_resend.emails >= 100

    await wait_for(some, 30, 0.05, "first batch")
    t0, e0 = time.time(), fake_resend.emails
    await asyncio.sleep(3.0)
    rate = (fake_resend.emails - e0) / (time.time() - t0)
    assert 65 <= rate <= 135, rate  # batches of 100 at 100/s: one per second
    # When the limit is raised through the API, Then the workers speed up within seconds
    assert (await api.put("/api/settings/email", json={"rate_limit": 0}, headers=api.h)).status == 200
    changed = time.time()

    async def finished():
        return (await campaign(pool, cid))["status"] == "sent"

    await wait_for(finished, 20, 0.1, "campaign to finish")
    assert time.time() - changed < 5.0
    assert fake_resend.stats()["duplicates"] == 0


async def test_lost_batch_messages_are_recovered_by_the_sweeper(api, pool, fake_resend, workers):
    # Given a sending campaign whose batch messages were all lost (e.g. in a Redis outage)
    from sender import campaigns as domain

    await add_leads(pool, 500)
    cid = await make_campaign(api)
    await domain.request_send(pool, cid)
    await domain.write_ledger(pool, cid)
    await pool.execute("UPDATE messages SET status = 'sending' WHERE campaign_id = $1 AND batch = 0", cid)
    # When a worker runs with a short stall threshold, Then the sweeper finishes the campaign
    workers.start(threads=2, MAILGENIUS_SENDER_STALL_SECONDS="2", MAILGENIUS_SENDER_SWEEP_INTERVAL="1")

    async def finished():
        return (await campaign(pool, cid))["status"] == "sent"

    await wait_for(finished, 30, 0.2, "the sweeper to re-dispatch\n" + workers.logs())
    st = fake_resend.stats()
    assert st["unique_recipients"] == 500 and st["duplicates"] == 0
