"""The signed bounce/complaint webhook for other ESPs (POST /webhooks/bounces): HMAC-SHA256 over
timestamp + body, a replay window, 401 on a bad signature, 400 on a bad body, exactly once."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import CollectorRegistry

from sender import bounces, campaigns
from sender.app import create_app

from .conftest import add_leads, campaign, drain, make_campaign

SECRET = "bounce-webhook-test-secret"


@pytest.fixture
def ssettings(ssettings):
    return ssettings.replace(bounce_webhook_secret=SECRET)


def signed(body: dict | bytes, *, ts: float | None = None, secret: str = SECRET) -> tuple[bytes, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    ts = int(time.time() if ts is None else ts)
    return raw, {bounces.TS_HEADER: str(ts), bounces.SIG_HEADER: bounces.sign(secret, ts, raw),
                 "Content-Type": "application/json"}


async def sent(api, pool, send_ctx, n=3):
    await add_leads(pool, n)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    rows = await pool.fetch("SELECT id, lead_id, email FROM messages WHERE campaign_id = $1 ORDER BY id", cid)
    return cid, rows


def metric(api, event: str, provider="resend"):
    return api.registry.get_sample_value("mailgenius_email_events_total", {"provider": provider, "event": event})


async def test_signed_bounce_and_complaint_apply_once(api, pool, send_ctx):
    cid, rows = await sent(api, pool, send_ctx)
    # a hard bounce by ledger id
    raw, h = signed({"id": "esp-evt-1", "type": "bounce", "bounce_type": "hard", "message_id": rows[0]["id"],
                     "status": "5.1.1", "diagnostic": "550 5.1.1 user unknown"})
    resp = await api.post("/webhooks/bounces", data=raw, headers=h)
    assert resp.status == 200, await resp.text()
    assert (await resp.json()) == {"ok": True, "duplicate": False, "event": "bounced",
                                   "message_id": rows[0]["id"], "changed": True}
    # a complaint by the Message-ID we sent, with its recipient
    raw2, h2 = signed({"id": "esp-evt-2", "type": "complaint", "message_id": f"<mg-{rows[1]['id']}@example.com>",
                       "recipient": rows[1]["email"].upper(), "occurred_at": "2026-01-02T03:04:05Z"})
    assert (await api.post("/webhooks/bounces", data=raw2, headers=h2)).status == 200
    # the same events again (a retrying ESP), re-signed now and as first sent
    for r, hh in ((raw, h), signed(json.loads(raw2))):
        resp = await api.post("/webhooks/bounces", data=r, headers=hh)
        assert resp.status == 200 and (await resp.json())["duplicate"] is True
    leads = {r["id"]: r["status"] for r in await pool.fetch("SELECT id, status FROM leads")}
    assert (leads[rows[0]["lead_id"]], leads[rows[1]["lead_id"]], leads[rows[2]["lead_id"]]) == (
        "bounced", "complained", "active")
    c = await campaign(pool, cid)
    assert (c["bounced"], c["complained"]) == (1, 1)
    assert (metric(api, "bounced"), metric(api, "complained")) == (1, 1)
    assert await pool.fetchval("SELECT count(*) FROM email_events WHERE provider = 'webhook'") == 2
    # a second, different event for an already bounced message changes nothing and counts nothing
    raw, h = signed({"id": "esp-evt-3", "type": "bounce", "message_id": rows[0]["id"]})
    assert (await (await api.post("/webhooks/bounces", data=raw, headers=h)).json())["changed"] is False
    assert (await campaign(pool, cid))["bounced"] == 1 and metric(api, "bounced") == 1


async def test_a_message_id_naming_another_recipient_is_not_applied(api, pool, send_ctx):
    cid, rows = await sent(api, pool, send_ctx)
    raw, h = signed({"id": "esp-evt-x", "type": "complaint", "message_id": f"<mg-{rows[0]['id']}@example.com>",
                     "recipient": "someone-else@example.org"})
    resp = await api.post("/webhooks/bounces", data=raw, headers=h)
    assert resp.status == 200 and (await resp.json())["message_id"] is None
    assert (await campaign(pool, cid))["complained"] == 0
    assert await pool.fetchval("SELECT count(*) FROM leads WHERE status <> 'active'") == 0


async def test_bad_signatures_are_401_and_bad_bodies_400_recording_nothing(api, pool, send_ctx):
    cid, rows = await sent(api, pool, send_ctx)
    good = {"id": "e1", "type": "bounce", "message_id": rows[0]["id"]}
    # another secret
    raw, h = signed(good, secret="not-the-secret")
    resp = await api.post("/webhooks/bounces", data=raw, headers=h)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_signature"
    # tampered body under a valid signature
    raw, h = signed(good)
    assert (await api.post("/webhooks/bounces", data=raw.replace(b"bounce", b"complaint", 1), headers=h)).status == 401
    # outside the replay window, either side
    for delta in (-bounces.WEBHOOK_TOLERANCE - 5, bounces.WEBHOOK_TOLERANCE + 5):
        raw, h = signed(good, ts=time.time() + delta)
        assert (await api.post("/webhooks/bounces", data=raw, headers=h)).status == 401
    # missing headers, garbage timestamp
    assert (await api.post("/webhooks/bounces", data=raw)).status == 401
    raw, h = signed(good)
    h[bounces.TS_HEADER] = "yesterday"
    assert (await api.post("/webhooks/bounces", data=raw, headers=h)).status == 401
    # correctly signed but malformed: a 400 naming the problem
    for bad, words in ((b"not json", "JSON"), (b"[1]", "object"), ({"type": "bounce"}, "id"),
                       ({"id": "e", "type": "open", "message_id": 1}, "type"),
                       ({"id": "e", "type": "bounce", "bounce_type": "medium", "message_id": 1}, "bounce_type"),
                       ({"id": "e", "type": "bounce"}, "message_id"),
                       ({"id": "e", "type": "bounce", "message_id": "<other@x>", "recipient": "a@b.c"}, "message_id"),
                       ({"id": "e", "type": "bounce", "message_id": "<mg-1@x>"}, "recipient"),
                       ({"id": "e", "type": "bounce", "message_id": 2**64}, "range"),
                       ({"id": "e", "type": "bounce", "message_id": 1, "occurred_at": "soon"}, "occurred_at")):
        raw, h = signed(bad)
        resp = await api.post("/webhooks/bounces", data=raw, headers=h)
        assert resp.status == 400, (bad, await resp.text())
        assert words in (await resp.json())["error"]["message"], bad
    assert await pool.fetchval("SELECT count(*) FROM email_events") == 0
    c = await campaign(pool, cid)
    assert (c["bounced"], c["complained"]) == (0, 0)


async def test_without_a_secret_the_webhook_is_503(aiohttp_client, ssettings, pool):
    # an app whose settings hold no secret answers 503 (not configured), never 200
    client = await aiohttp_client(create_app(ssettings.replace(bounce_webhook_secret=""), registry=CollectorRegistry()))
    raw = json.dumps({"id": "e", "type": "bounce", "message_id": 1}).encode()
    ts = int(time.time())
    resp = await client.post("/webhooks/bounces", data=raw,
                             headers={bounces.TS_HEADER: str(ts), bounces.SIG_HEADER: bounces.sign("", ts, raw)})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "webhook_not_configured"
