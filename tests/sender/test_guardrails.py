"""Campaign guard-rails with the thresholds of alerting/rules.yml: the outcome of a finished
campaign by its failed share, and the auto-pause on bounce rate, error rate and the 0.3 %
complaint rate, each above and not below its threshold and only past the minimum sample; the
reason in the API; resume is explicit and clears it."""

from __future__ import annotations

import json
import time

import pytest

from exporter.summary import campaign_figures
from sender import bounces, campaigns, guardrails
from sender.sending import send_campaign_batch

from .conftest import add_leads, campaign, drain, make_campaign

SECRET = "guardrail-webhook-secret"
T = guardrails.thresholds()


@pytest.fixture
def ssettings(ssettings):
    return ssettings.replace(bounce_webhook_secret=SECRET)


def test_thresholds_come_from_alerting_rules():
    # one source: the numbers the guard-rails use are rules.yml's (the complaint limit is 2024's 0.3 %)
    import yaml

    t = yaml.safe_load(guardrails.RULES_PATH.read_text())["thresholds"]
    assert (T.failed_share, T.min_recipients, T.bounce_ratio, T.error_ratio, T.complaint_ratio) == (
        t["campaign_failed_share"], t["campaign_pause_min_recipients"], t["campaign_pause_bounce_ratio"],
        t["campaign_pause_error_ratio"], t["campaign_pause_complaint_ratio"])
    assert T.complaint_ratio == 0.003 and t["email_complaint_ratio"] == 0.001


async def start(api, pool, ctx, n_ok: int, *, n_reject: int = 0, tail: int = 100, batches: int | None = None) -> int:
    """A campaign of n_ok (+ n_reject refused) + tail recipients, its first ``batches`` batches sent."""
    await add_leads(pool, n_ok, prefix="ok")
    if n_reject:
        await add_leads(pool, n_reject, prefix="reject")
    if tail:
        await add_leads(pool, tail, prefix="tail")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    total = n_ok + n_reject + tail
    for b in range(batches if batches is not None else (total + 99) // 100):
        await send_campaign_batch(ctx, cid, b)
    return cid


async def report(api, kind: str, message_id: int) -> None:
    body = json.dumps({"id": f"{kind}-{message_id}", "type": kind, "message_id": message_id}).encode()
    ts = int(time.time())
    resp = await api.post("/webhooks/bounces", data=body,
                          headers={bounces.TS_HEADER: str(ts), bounces.SIG_HEADER: bounces.sign(SECRET, ts, body)})
    assert resp.status == 200, await resp.text()


async def sent_ids(pool, cid: int, n: int) -> list[int]:
    return [r["id"] for r in await pool.fetch(
        "SELECT id FROM messages WHERE campaign_id = $1 AND status = 'sent' ORDER BY id LIMIT $2", cid, n)]


def paused_metric(registry, reason: str) -> float:
    return registry.get_sample_value("mailgenius_campaigns_auto_paused_total", {"reason": reason})


async def test_complaint_rate_pauses_at_0_3_percent_and_resume_clears_it(api, pool, send_ctx):
    # Given a sending campaign with 1000 of its 1100 recipients sent
    cid = await start(api, pool, send_ctx, 1000, batches=10)
    ids = await sent_ids(pool, cid, 10)
    # When 2 of them complain (0.2 %): still sending
    for mid in ids[:2]:
        await report(api, "complaint", mid)
    c = await campaign(pool, cid)
    assert (c["status"], c["complained"], c["pause_reason"]) == ("sending", 2, None)
    # When a 3rd complains (0.3 %, the 2024 Gmail/Yahoo limit): paused, with the reason
    await report(api, "complaint", ids[2])
    resp = await api.get(f"/api/campaigns/{cid}", headers=api.h)
    body = await resp.json()
    assert body["status"] == "paused"
    assert body["pause_reason"].startswith("complaint_rate: 3 complaints of 1000 sent (0.30 %) >= 0.30 %")
    assert body["auto_paused_at"] is not None
    assert paused_metric(api.registry, "complaint_rate") == 1
    # And the monitoring page's summary lists it with the reason
    figures, _totals = await campaign_figures(pool)
    assert [(c["id"], c["pause_reason"]) for c in figures["auto_paused"]] == [(cid, body["pause_reason"])]
    # And its remaining batch sends nothing while paused
    await send_campaign_batch(send_ctx, cid, 10)
    assert (await campaign(pool, cid))["queued"] == 100
    # When the operator resumes it (explicitly)
    resp = await api.post(f"/api/campaigns/{cid}/resume", headers=api.h)
    assert resp.status == 200 and (await resp.json())["status"] == "sending"
    c = await campaign(pool, cid)
    assert (c["status"], c["pause_reason"], c["auto_paused_at"]) == ("sending", None, None)
    # Then the old figures do not pause it again: it finishes
    await report(api, "complaint", ids[3])
    await send_campaign_batch(send_ctx, cid, 10)
    c = await campaign(pool, cid)
    assert (c["status"], c["complained"], c["sent"]) == ("sent", 4, 1100)
    assert (await campaign_figures(pool))[0]["auto_paused"] == []
    assert paused_metric(api.registry, "complaint_rate") == 1


async def test_bounce_rate_pauses_above_5_percent_and_only_past_the_minimum_sample(api, pool, send_ctx):
    # Given 900 of 1100 recipients sent, and 60 of them bounced (6.7 %, but below the sample)
    cid = await start(api, pool, send_ctx, 1000, batches=9)
    ids = await sent_ids(pool, cid, 60)
    for mid in ids[:50]:
        await report(api, "bounce", mid)
    assert (await campaign(pool, cid))["status"] == "sending"
    # When the 10th batch is recorded: 50 bounced of 1000 attempted is 5 %, not above
    await send_campaign_batch(send_ctx, cid, 9)
    c = await campaign(pool, cid)
    assert (c["status"], c["bounced"], c["sent"] + c["failed"]) == ("sending", 50, 1000)
    # When one more bounces (5.1 %): paused by the event path
    await report(api, "bounce", ids[50])
    c = await campaign(pool, cid)
    assert c["status"] == "paused" and c["pause_reason"].startswith("bounce_rate: 51 bounced of 1000 attempted")
    assert paused_metric(api.registry, "bounce_rate") == 1


async def test_bounce_rate_crossed_by_the_send_path_pauses_too(api, pool, send_ctx):
    # Given 60 bounces among the first 900 sent (below the minimum sample: no pause yet)
    cid = await start(api, pool, send_ctx, 1000, batches=9)
    for mid in await sent_ids(pool, cid, 60):
        await report(api, "bounce", mid)
    assert (await campaign(pool, cid))["status"] == "sending"
    # When the batch that reaches the sample is recorded (60 / 1000 = 6 %)
    await send_campaign_batch(send_ctx, cid, 9)
    # Then the send path pauses it
    c = await campaign(pool, cid)
    assert c["status"] == "paused" and c["pause_reason"].startswith("bounce_rate: 60 bounced of 1000 attempted")
    assert paused_metric(send_ctx.registry, "bounce_rate") == 1


@pytest.mark.parametrize(("rejects", "paused"), [(100, False), (101, True)])
async def test_error_rate_pauses_above_10_percent(api, pool, send_ctx, rejects, paused):
    # Given a campaign whose first 1000 recipients include `rejects` refused by the provider
    cid = await start(api, pool, send_ctx, 1000 - rejects, n_reject=rejects)
    c = await campaign(pool, cid)
    if paused:  # 101 / 1000 > 10 %: paused after the 10th batch, the 11th never sent
        assert (c["status"], c["failed"], c["sent"], c["queued"]) == ("paused", 101, 899, 100)
        assert c["pause_reason"].startswith("error_rate: 101 failed of 1000 attempted (10.10 %) > 10.00 %")
        assert paused_metric(send_ctx.registry, "error_rate") == 1
    else:  # exactly 10 %: not above; it finishes (100 / 1100 failed: below the failed share too)
        assert (c["status"], c["failed"], c["sent"], c["pause_reason"]) == ("sent", 100, 1000, None)
        assert paused_metric(send_ctx.registry, "error_rate") == 0


@pytest.mark.parametrize(("rejects", "outcome"), [(2, "sent"), (3, "failed")])
async def test_a_finished_campaign_counts_failed_above_the_failed_share(api, pool, send_ctx, rejects, outcome):
    # Given 20 recipients of which `rejects` are refused (10 % is not above the share, 15 % is)
    await add_leads(pool, 20 - rejects, prefix="ok")
    await add_leads(pool, rejects, prefix="reject")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    # Then its status and mailgenius_campaigns_finished_total{outcome} say so
    c = await campaign(pool, cid)
    assert (c["status"], c["failed"], c["sent"]) == (outcome, rejects, 20 - rejects)
    for o in ("sent", "failed"):
        assert send_ctx.registry.get_sample_value("mailgenius_campaigns_finished_total", {"outcome": o}) == (
            1 if o == outcome else 0)
