"""Campaign API and the in-process send path against real Postgres, Redis and the fake Resend."""

from __future__ import annotations

import pytest

from sender import campaigns
from sender.sending import send_campaign_batch

from .conftest import add_leads, campaign, drain, make_campaign


async def test_create_and_read_campaign_with_counts(api, pool):
    # Given a valid campaign body, When it is created, Then it is a draft with zero counts
    cid = await make_campaign(api, name="Spring")
    resp = await api.get(f"/api/campaigns/{cid}", headers=api.read_h)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "draft" and body["name"] == "Spring"
    for k in campaigns.COUNTS:
        assert body[k] == 0
    links = await pool.fetch("SELECT url FROM links WHERE campaign_id = $1", cid)
    assert [r["url"] for r in links] == ["https://shop.example.com/sale"]


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''|attr('__class__') }}",
    "{{ lead|attr('__init__') }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 1000000000 }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ '%999999999s' % 'x' }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{% set x = 'a' %}{{ x }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% include '/etc/passwd' %}",
    "{{ first_name",
    "{{ lead['__class__'] }}",
])
async def test_template_injection_refused_at_creation(api, pool, payload):
    # Given an injection payload in any part, When the campaign is created, Then 422 and nothing stored
    for part in ("subject", "html", "text"):
        body = {"name": "x", "subject": "s", "from_email": "a@example.com", "html": "<p>x</p>", "text": "x"}
        body[part] = payload
        resp = await api.post("/api/campaigns", json=body, headers=api.h)
        assert resp.status == 422, (part, payload, await resp.text())
        err = (await resp.json())["error"]
        assert err["code"] in ("template_refused", "template_error")
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 0


@pytest.mark.parametrize("body, field", [
    ({}, "name"),
    ({"name": "x", "subject": "s", "from_email": "not an address"}, "from_email"),
    ({"name": "x", "subject": "s", "from_email": "a@example.com\r\nBcc: x@evil.com", "html": "h"}, "from_email"),
    ({"name": "x", "subject": "s", "from_email": "a@example.com", "html": "h", "segment": {"tags": "vip"}}, "segment"),
    ({"name": "x", "subject": "s", "from_email": "a@example.com", "html": "h", "extra": 1}, "extra"),
    ({"name": "x", "subject": "s", "from_email": "a@example.com"}, "html or text"),
])
async def test_bad_campaign_bodies_are_clear_4xx(api, body, field):
    resp = await api.post("/api/campaigns", json=body, headers=api.h)
    assert resp.status == 422
    assert field in (await resp.json())["error"]["message"]


async def test_auth_and_not_found(api):
    assert (await api.post("/api/campaigns", json={})).status == 401
    resp = await api.post("/api/campaigns", json={}, headers=api.read_h)
    assert resp.status == 403
    resp = await api.get("/api/campaigns/999999", headers=api.read_h)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await api.post("/api/campaigns", data=b"{not json", headers=api.h)
    assert resp.status == 400


async def test_excluded_leads_never_mailed(api, pool, send_ctx, fake_resend):
    # Given active leads in and out of the segment, plus suppressed leads inside it
    await add_leads(pool, 30, tags=["vip"], prefix="in")
    await add_leads(pool, 10, tags=["other"], prefix="out")
    await add_leads(pool, 5, tags=["vip"], status="unsubscribed", prefix="unsub")
    await add_leads(pool, 5, tags=["vip"], status="bounced", prefix="bounced")
    await add_leads(pool, 5, tags=["vip"], status="complained", prefix="compl")
    cid = await make_campaign(api, segment={"tags": ["vip"]})
    await campaigns.request_send(pool, cid)
    # When the campaign is sent
    await drain(send_ctx, pool, cid)
    # Then only the 30 active vip leads were mailed, each once
    assert set(fake_resend.counts) == {r["email"] for r in await pool.fetch("SELECT email FROM leads WHERE email LIKE 'in-%'")}
    assert all(n == 1 for n in fake_resend.counts.values())
    c = await campaign(pool, cid)
    assert (c["status"], c["recipients"], c["sent"], c["queued"], c["failed"]) == ("sent", 30, 30, 0, 0)
    assert send_ctx.registry.get_sample_value("mailgenius_emails_sent_total", {"provider": "resend"}) == 30
    assert send_ctx.registry.get_sample_value("mailgenius_campaigns_finished_total", {"outcome": "sent"}) == 1


async def test_render_personalises_and_adds_tracking(api, pool, send_ctx, fake_resend):
    await add_leads(pool, 1, tags=["t"], prefix="solo")
    cid = await make_campaign(api, segment={"tags": ["t"]})
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    [email] = fake_resend.last_payload
    assert email["subject"] == "Hello Name1"
    assert "/t/c/" in email["html"] and "https://shop.example.com/sale" not in email["html"]
    assert "/t/o/" in email["html"]
    assert email["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert email["headers"]["List-Unsubscribe"].startswith("<http://mail.example.test/u/")
    assert fake_resend.last_headers["Idempotency-Key"].startswith(f"mailgenius-c{cid}-b0-")


async def test_lead_unsubscribed_after_ledger_is_skipped(api, pool, send_ctx, fake_resend):
    ids = await add_leads(pool, 3, prefix="late")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    await pool.execute("UPDATE leads SET status = 'unsubscribed' WHERE id = $1", ids[0])
    await send_campaign_batch(send_ctx, cid, 0)
    assert len(fake_resend.counts) == 2
    c = await campaign(pool, cid)
    assert (c["sent"], c["queued"], c["status"]) == (2, 0, "sent")
    assert await pool.fetchval("SELECT status FROM messages WHERE lead_id = $1", ids[0]) == "cancelled"


async def test_redelivered_batch_skips_what_was_sent(api, pool, send_ctx, fake_resend):
    await add_leads(pool, 150)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    calls = fake_resend.calls
    # When both batches are delivered again
    out0 = await send_campaign_batch(send_ctx, cid, 0)
    out1 = await send_campaign_batch(send_ctx, cid, 1)
    assert out0.detail and out1.detail and fake_resend.calls == calls
    assert fake_resend.stats()["duplicates"] == 0 and len(fake_resend.counts) == 150


async def test_crashed_attempt_is_resent_with_the_same_idempotency_key(api, pool, send_ctx, fake_resend):
    # Given a batch whose provider call succeeded but whose worker died before recording it
    await add_leads(pool, 20)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    await pool.execute("UPDATE campaigns SET status = 'paused' WHERE id = $1", cid)
    await send_campaign_batch(send_ctx, cid, 0)
    assert fake_resend.calls == 0  # paused: nothing sent
    await pool.execute("UPDATE campaigns SET status = 'sending' WHERE id = $1", cid)
    import sender.ledger as ledger
    real_record = ledger.record

    async def crash(*a, **kw):
        raise RuntimeError("worker died")

    ledger.record = crash
    try:
        with pytest.raises(RuntimeError):
            await send_campaign_batch(send_ctx, cid, 0)
    finally:
        ledger.record = real_record
    assert fake_resend.stats()["emails"] == 20
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE status = 'sending'") == 20
    # When the batch is redelivered, Then the provider replays (same key) and nobody gets two
    await send_campaign_batch(send_ctx, cid, 0)
    st = fake_resend.stats()
    assert st["replays"] == 1 and st["duplicates"] == 0 and st["emails"] == 20
    c = await campaign(pool, cid)
    assert (c["sent"], c["status"]) == (20, "sent")


async def test_provider_429_then_200_honours_retry_after(api, pool, send_ctx, fake_resend):
    await add_leads(pool, 10)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    fake_resend.script.append({"status": 429, "retry_after": "1"})
    await drain(send_ctx, pool, cid)
    log = fake_resend.call_log
    assert [s for _t, _n, s in log] == [429, 200]
    assert log[1][0] - log[0][0] >= 0.95
    c = await campaign(pool, cid)
    assert (c["sent"], c["failed"]) == (10, 0)


async def test_provider_500_then_200_is_retried(api, pool, send_ctx, fake_resend):
    await add_leads(pool, 10)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    fake_resend.script.append({"status": 500})
    await drain(send_ctx, pool, cid)
    assert [s for _t, _n, s in fake_resend.call_log] == [500, 200]
    assert len(fake_resend.counts) == 10
    assert (await campaign(pool, cid))["sent"] == 10


# the retry budget (exhausted -> failed, retry-failed requeues): tests/sender/test_retry_budget.py


async def test_per_recipient_4xx_recorded_with_reason(api, pool, send_ctx, fake_resend):
    await add_leads(pool, 4, prefix="ok")
    await add_leads(pool, 2, prefix="reject")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    c = await campaign(pool, cid)
    # 2 of 6 recipients failed: above campaign_failed_share (alerting/rules.yml), so the
    # campaign's outcome is failed (tests/sender/test_guardrails.py covers the ratio)
    assert (c["sent"], c["failed"], c["status"]) == (4, 2, "failed")
    errs = await pool.fetch("SELECT last_error FROM messages WHERE status = 'failed'")
    assert all("not deliverable" in r["last_error"] for r in errs)
    assert send_ctx.registry.get_sample_value(
        "mailgenius_email_send_failures_total", {"provider": "resend", "reason": "rejected"}) == 2


async def test_pause_resume_cancel_state_machine(api, pool, send_ctx, fake_resend):
    await add_leads(pool, 250)
    cid = await make_campaign(api)
    assert (await api.post(f"/api/campaigns/{cid}/pause", headers=api.h)).status == 409
    resp = await api.post(f"/api/campaigns/{cid}/send", headers=api.h)
    assert resp.status == 202 and (await resp.json())["status"] == "queued"
    assert (await api.post(f"/api/campaigns/{cid}/send", headers=api.h)).status == 409
    await campaigns.write_ledger(pool, cid)
    await send_campaign_batch(send_ctx, cid, 0)
    # pause: later batches send nothing
    assert (await api.post(f"/api/campaigns/{cid}/pause", headers=api.h)).status == 200
    await send_campaign_batch(send_ctx, cid, 1)
    assert len(fake_resend.counts) == 100
    # resume: the rest goes, nobody twice
    resp = await api.post(f"/api/campaigns/{cid}/resume", headers=api.h)
    assert resp.status == 200 and (await resp.json())["status"] == "sending"
    assert await campaigns.open_batches(pool, cid) == [1, 2]
    await send_campaign_batch(send_ctx, cid, 1)
    # cancel: the rest is cancelled, the counts stay exact
    resp = await api.post(f"/api/campaigns/{cid}/cancel", headers=api.h)
    assert resp.status == 200 and (await resp.json())["cancelled_recipients"] == 50
    await send_campaign_batch(send_ctx, cid, 2)
    c = await campaign(pool, cid)
    assert (c["status"], c["sent"], c["queued"], c["recipients"]) == ("cancelled", 200, 0, 250)
    assert len(fake_resend.counts) == 200 and fake_resend.stats()["duplicates"] == 0
    assert (await api.post(f"/api/campaigns/{cid}/resume", headers=api.h)).status == 409
    assert api.registry.get_sample_value("mailgenius_campaigns_finished_total", {"outcome": "cancelled"}) == 1


async def test_empty_segment_finishes_immediately(api, pool):
    cid = await make_campaign(api, segment={"tags": ["nobody"]})
    await campaigns.request_send(pool, cid)
    assert await campaigns.write_ledger(pool, cid) == 0
    c = await campaign(pool, cid)
    assert (c["status"], c["recipients"]) == ("sent", 0)
    assert await campaigns.write_ledger(pool, cid) is None  # a redelivered dispatch writes nothing


async def test_lead_deleted_after_the_ledger_is_cancelled_not_sent(api, pool, send_ctx, fake_resend):
    ids = await add_leads(pool, 3, prefix="gone")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    assert await campaigns.write_ledger(pool, cid) == 3
    await pool.execute("DELETE FROM leads WHERE id = $1", ids[1])
    await send_campaign_batch(send_ctx, cid, 0)
    c = await campaign(pool, cid)
    assert (c["sent"], c["queued"], c["status"]) == (2, 0, "sent")
    assert len(fake_resend.counts) == 2
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'cancelled'", cid) == 1


async def test_sweeper_redispatches_a_stalled_campaign_only(api, pool, send_ctx, fake_resend, ssettings, redis_client,
                                                            monkeypatch):
    from mailgenius.cache import rkey
    from sender import sweeper

    # messages other in-process tests enqueued (no worker here) must not silence the sweep
    ssettings = ssettings.replace(sender=ssettings.sender.replace(sweep_max_waiting=10**9))
    await redis_client.delete(rkey(ssettings, "sender", "sweep"))

    # Given a campaign whose batch 0 was claimed by a worker that vanished and whose batch 1
    # message was lost (nothing in any queue), last progress 100 s ago
    await add_leads(pool, 150)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    await pool.execute("UPDATE messages SET status = 'sending' WHERE campaign_id = $1 AND batch = 0", cid)
    await pool.execute("UPDATE campaigns SET updated_at = now() - interval '100 seconds' WHERE id = $1", cid)
    # While a live worker holds one of its batches, it is not stalled
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1::int, 0)", cid)
        assert await sweeper.find_stalled(pool, stall_seconds=30) == []
        await holder.execute("SELECT pg_advisory_unlock($1::int, 0)", cid)
    # When the sweeper runs, Then it re-dispatches it once (and leaves it alone for a while)
    enqueued = []
    assert await sweeper.sweep_once(pool, redis_client, ssettings, enqueued.append) == [cid]
    assert enqueued == [cid]
    assert await sweeper.find_stalled(pool, stall_seconds=30) == []
    # and the re-dispatched batches finish the campaign, nobody twice
    for b in await campaigns.open_batches(pool, cid):
        await send_campaign_batch(send_ctx, cid, b)
    c = await campaign(pool, cid)
    assert (c["status"], c["sent"], c["queued"]) == ("sent", 150, 0)
    assert fake_resend.stats()["duplicates"] == 0 and len(fake_resend.counts) == 150


async def test_429_pauses_every_batch_of_the_process(api, pool, send_ctx, fake_resend):
    # Given two batches, the provider answering the first call 429 Retry-After: 1
    import asyncio

    await add_leads(pool, 200)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    fake_resend.script.append({"status": 429, "retry_after": "1"})
    # When both run, the second starting after the 429
    first = asyncio.create_task(send_campaign_batch(send_ctx, cid, 0))
    while not fake_resend.call_log:
        await asyncio.sleep(0.01)
    await send_campaign_batch(send_ctx, cid, 1)
    await first
    # Then no call reached the provider during the Retry-After window
    t429 = fake_resend.call_log[0][0]
    assert [s for _t, _n, s in fake_resend.call_log] == [429, 200, 200]
    assert all(t - t429 >= 0.95 for t, _n, _s in fake_resend.call_log[1:])
    assert (await campaign(pool, cid))["sent"] == 200


async def test_big_cancel_answers_at_once_and_finishes_in_the_background(api, pool, monkeypatch):
    import asyncio

    monkeypatch.setattr(campaigns, "CANCEL_CHUNK", 100)
    await add_leads(pool, 450)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    resp = await api.post(f"/api/campaigns/{cid}/cancel", headers=api.h)
    body = await resp.json()
    assert resp.status == 200 and body["cleanup"] == "in_progress" and body["cancelled_recipients"] == 100
    for _ in range(100):
        if (await campaign(pool, cid))["queued"] == 0:
            break
        await asyncio.sleep(0.05)
    c = await campaign(pool, cid)
    assert (c["status"], c["queued"]) == ("cancelled", 0)
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'cancelled'", cid) == 450


async def test_sweeper_finishes_an_interrupted_cancellation(api, pool):
    from sender import sweeper

    await add_leads(pool, 120)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    # the API died right after flipping the status
    await pool.execute("UPDATE campaigns SET status = 'cancelled', updated_at = now() - interval '1 hour' WHERE id = $1", cid)
    assert await sweeper.finish_cancellations(pool, stall_seconds=30) == [cid]
    c = await campaign(pool, cid)
    assert (c["queued"], c["status"]) == (0, "cancelled")
    assert await sweeper.finish_cancellations(pool, stall_seconds=30) == []
