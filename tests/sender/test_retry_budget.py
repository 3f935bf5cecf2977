"""The provider retry path (sender/delivery.py) in-process, against real Postgres, Redis and the
fake Resend: quick attempts, hand-back to dramatiq, the retry budget measured in Postgres,
provider error counting, the fleet-wide 429 pause, the SMTP Message-ID."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailgenius.settings import SenderSettings
from sender import campaigns, delivery
from sender.providers import OutEmail, ProviderError, build_mime, message_id_header
from sender.sending import send_campaign_batch

from .conftest import add_leads, campaign, make_campaign

#: the sender's defaults (settings.sender of an empty environment)
config = SenderSettings()


def tune(monkeypatch, ctx, **changes) -> None:
    """Give the send context's injected settings other sender tunables for this test."""
    monkeypatch.setattr(ctx, "settings", ctx.settings.replace(sender=ctx.settings.sender.replace(**changes)))


def provider_errors(ctx, reason: str, provider: str = "resend") -> float:
    return ctx.registry.get_sample_value("mailgenius_provider_errors_total",
                                         {"provider": provider, "reason": reason})


async def start(api, pool, n: int) -> tuple[int, list[int]]:
    await add_leads(pool, n)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    return cid, await campaigns.open_batches(pool, cid)


async def test_outage_hands_batch_back_and_exhausted_budget_fails_rows_then_retry_failed_sends(
        api, pool, send_ctx, fake_resend, monkeypatch):
    tune(monkeypatch, send_ctx, max_attempts=2, backoff_base=0.05, send_retry_budget=1.5)
    cid, batches = await start(api, pool, 10)
    assert batches == [0]
    # Given a provider answering 5xx to every call
    fake_resend.script.extend([{"status": 503}, {"status": 500, "message": "first outage"}])
    # When the batch is delivered, Then after the quick attempts it is handed back to dramatiq
    # (a dramatiq.Retry with a delay), the rows stay `sending` with the last error noted
    with pytest.raises(delivery.ProviderUnavailable) as info:
        await send_campaign_batch(send_ctx, cid, 0)
    assert info.value.delay >= send_ctx.settings.sender.redelivery_min * 1000
    rows = await pool.fetch("SELECT status, last_error, retry_since FROM messages WHERE campaign_id = $1", cid)
    assert {r["status"] for r in rows} == {"sending"}
    assert all("first outage" in r["last_error"] and r["retry_since"] is not None for r in rows)
    assert provider_errors(send_ctx, "server_error") == 2  # per call, not per recipient (10)
    c = await campaign(pool, cid)
    assert (c["status"], c["queued"], c["failed"]) == ("sending", 10, 0)
    # ...and a redelivery within the budget is handed back again, the budget still running
    fake_resend.script.extend([{"status": 502, "message": "still down"}] * 2)
    with pytest.raises(delivery.ProviderUnavailable):
        await send_campaign_batch(send_ctx, cid, 0)
    assert provider_errors(send_ctx, "server_error") == 4
    # When a redelivery finds the budget (measured from the first failure) used up
    await asyncio.sleep(1.6)
    fake_resend.script.append({"status": 500, "message": "bad gateway for good"})
    out = await send_campaign_batch(send_ctx, cid, 0)
    # Then the rows are failed with the last error, the campaign finishes failed
    assert out.failed == 10
    c = await campaign(pool, cid)
    assert (c["status"], c["failed"], c["sent"], c["queued"]) == ("failed", 10, 0, 0)
    rows = await pool.fetch("SELECT status, last_error, retry_since FROM messages WHERE campaign_id = $1", cid)
    assert {r["status"] for r in rows} == {"failed"}
    assert all("bad gateway for good" in r["last_error"] and "retry budget" in r["last_error"] for r in rows)
    assert all(r["retry_since"] is None for r in rows)  # retry-failed starts a fresh budget
    assert send_ctx.registry.get_sample_value(
        "mailgenius_email_send_failures_total", {"provider": "resend", "reason": "server_error"}) == 10
    assert len(fake_resend.counts) == 0
    # When retry-failed is called, Then the rows are pending again and are sent (one failure
    # now is within a fresh budget: handed back, not failed)
    resp = await api.post("/api/campaigns/retry-failed", json={"campaign_id": cid}, headers=api.h)
    assert resp.status == 200 and (await resp.json())["campaigns"] == [cid]
    c = await campaign(pool, cid)
    assert (c["status"], c["failed"], c["queued"]) == ("sending", 0, 10)
    fake_resend.script.append({"status": 500})
    out = await send_campaign_batch(send_ctx, cid, 0)
    c = await campaign(pool, cid)
    assert (c["status"], c["sent"], c["failed"]) == ("sent", 10, 0)
    assert len(fake_resend.counts) == 10 and set(fake_resend.counts.values()) == {1}


async def test_redelivery_resends_with_the_same_idempotency_key(api, pool, send_ctx, fake_resend, monkeypatch):
    tune(monkeypatch, send_ctx, max_attempts=1)
    cid, _ = await start(api, pool, 5)
    provider = await send_ctx.provider()
    keys: list[str] = []
    real = provider.send_batch

    async def recording(emails, key):
        keys.append(key)
        return await real(emails, key)

    monkeypatch.setattr(provider, "send_batch", recording)
    # Given a batch handed back after a 500
    fake_resend.script.append({"status": 500})
    with pytest.raises(delivery.ProviderUnavailable):
        await send_campaign_batch(send_ctx, cid, 0)
    # When dramatiq redelivers it, Then the same rows go out under the same idempotency key
    await send_campaign_batch(send_ctx, cid, 0)
    assert len(keys) == 2 and keys[0] == keys[1], keys
    assert (await campaign(pool, cid))["sent"] == 5
    assert len(fake_resend.counts) == 5


def test_dramatiq_retry_count_never_ends_an_outage_before_the_budget():
    err = ProviderError("server_error", "HTTP 500", True)
    assert delivery.retry_when(10_000, delivery.ProviderUnavailable(err, 1.0, 0.0))
    assert delivery.retry_when(0, RuntimeError("postgres down"))
    assert not delivery.retry_when(config.actor_max_retries, RuntimeError("postgres down"),
                                   max_retries=config.actor_max_retries)


def test_redelivery_delay_grows_with_the_outage_within_bounds():
    err = ProviderError("server_error", "HTTP 500", True)
    assert config.redelivery_min <= delivery.redelivery_delay(0, err, config) <= config.redelivery_min * 1.2
    assert config.redelivery_max <= delivery.redelivery_delay(10_000, err, config) <= config.redelivery_max * 1.2
    assert 10 <= delivery.redelivery_delay(20, err, config) <= 12
    throttled = ProviderError("rate_limited", "HTTP 429", True, retry_after=7)
    assert 7 <= delivery.redelivery_delay(0, throttled, config) <= 8.4
    # the sweeper (STALL_SECONDS) never sees a retrying campaign as stalled
    assert config.redelivery_max * 1.2 < config.stall_seconds


async def test_429_pause_is_shared_through_redis(api, pool, send_ctx, fake_resend, redis_client, ssettings):
    # Given one worker told by the provider to wait 2 s
    cid, _ = await start(api, pool, 3)
    fake_resend.script.append({"status": 429, "retry_after": "2"})
    t0 = time.monotonic()
    await send_campaign_batch(send_ctx, cid, 0)
    assert time.monotonic() - t0 >= 1.9
    assert provider_errors(send_ctx, "rate_limited") == 1
    # Then the pause is in Redis, where a worker of another process (another context) honours it
    await delivery.pause_provider(send_ctx, "resend", 1.0)
    left = await redis_client.pttl(delivery._pause_key(send_ctx, "resend"))
    assert 0 < left <= 1000
    # a shorter pause never shortens a longer one
    await delivery.pause_provider(send_ctx, "resend", 0.1)
    assert await redis_client.pttl(delivery._pause_key(send_ctx, "resend")) > 500
    t0 = time.monotonic()
    slept = await delivery.wait_provider_pause(send_ctx, "resend")
    assert 0.5 < slept <= 1.0 and time.monotonic() - t0 >= 0.5
    assert await delivery.wait_provider_pause(send_ctx, "resend") == 0.0


async def test_client_errors_count_once_per_call(api, pool, send_ctx, fake_resend):
    cid, _ = await start(api, pool, 4)
    fake_resend.script.append({"status": 422, "message": "invalid from"})
    out = await send_campaign_batch(send_ctx, cid, 0)
    assert out.failed == 4
    assert provider_errors(send_ctx, "client_error") == 1
    assert provider_errors(send_ctx, "server_error") == 0


def test_smtp_message_id_is_stable_and_from_the_sender_domain():
    e = OutEmail(42, "to@example.org", "News <news@Shop.Example.com>", "s", "<p>h</p>", "t")
    assert message_id_header(42, e.from_email) == "<mg-42@shop.example.com>"
    assert build_mime(e)["Message-ID"] == build_mime(e)["Message-ID"] == "<mg-42@shop.example.com>"
    assert message_id_header(7, "no-domain") == "<mg-7@mailgenius.local>"
    assert message_id_header(7, "x@bad domain") == "<mg-7@mailgenius.local>"


async def test_resume_gives_rows_paused_mid_outage_a_fresh_budget(api, pool, send_ctx, fake_resend, monkeypatch):
    tune(monkeypatch, send_ctx, max_attempts=1, send_retry_budget=1.0)
    cid, _ = await start(api, pool, 5)
    # Given a batch handed back during an outage, then the campaign paused past the budget
    fake_resend.script.append({"status": 500, "message": "down"})
    with pytest.raises(delivery.ProviderUnavailable):
        await send_campaign_batch(send_ctx, cid, 0)
    resp = await api.post(f"/api/campaigns/{cid}/pause", headers=api.h)
    assert resp.status == 200, await resp.text()
    await asyncio.sleep(1.2)
    # When it is resumed and the provider fails once more
    resp = await api.post(f"/api/campaigns/{cid}/resume", headers=api.h)
    assert resp.status == 200, await resp.text()
    assert await pool.fetchval(
        "SELECT count(*) FROM messages WHERE campaign_id = $1 AND retry_since IS NOT NULL", cid) == 0
    fake_resend.script.append({"status": 500, "message": "still down"})
    # Then the paused time did not use the budget up: handed back again, nothing failed
    with pytest.raises(delivery.ProviderUnavailable):
        await send_campaign_batch(send_ctx, cid, 0)
    c = await campaign(pool, cid)
    assert (c["status"], c["failed"], c["queued"]) == ("sending", 0, 5)
    # and once the provider answers, every recipient is sent once
    await send_campaign_batch(send_ctx, cid, 0)
    assert (await campaign(pool, cid))["sent"] == 5
    assert len(fake_resend.counts) == 5 and set(fake_resend.counts.values()) == {1}
