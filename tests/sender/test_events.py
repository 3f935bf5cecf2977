"""Resend webhooks (Svix signatures), tracking links, unsubscribe."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from svix.webhooks import Webhook

from sender import campaigns
from sender.tracking import Tracker

from .conftest import (
    PUBLIC_URL,
    TRACKING_SECRET,
    WEBHOOK_SECRET,
    add_leads,
    campaign,
    drain,
    make_campaign,
)


def signed(body: dict | bytes, *, msg_id: str | None = None, when: dt.datetime | None = None,
           secret: str = WEBHOOK_SECRET) -> tuple[bytes, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    when = when or dt.datetime.now(dt.UTC)
    sig = Webhook(secret).sign(msg_id, when, raw.decode())
    return raw, {"svix-id": msg_id, "svix-timestamp": str(int(when.timestamp())), "svix-signature": sig,
                 "Content-Type": "application/json"}


async def sent_campaign(api, pool, send_ctx, n=3) -> tuple[int, list]:
    await add_leads(pool, n)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    rows = await pool.fetch("SELECT id, lead_id, provider_message_id FROM messages WHERE campaign_id = $1 ORDER BY id", cid)
    return cid, rows


def event(kind: str, pid: str, **data) -> dict:
    return {"type": kind, "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "data": {"email_id": pid, "created_at": dt.datetime.now(dt.UTC).isoformat(), **data}}


async def test_delivered_event_updates_ledger_and_latency(api, pool, send_ctx):
    cid, rows = await sent_campaign(api, pool, send_ctx)
    raw, headers = signed(event("email.delivered", rows[0]["provider_message_id"]))
    resp = await api.post("/webhooks/resend", data=raw, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["changed"] is True
    c = await campaign(pool, cid)
    assert c["delivered"] == 1
    assert await pool.fetchval("SELECT delivery FROM messages WHERE id = $1", rows[0]["id"]) == "delivered"
    reg = api.registry
    assert reg.get_sample_value("mailgenius_email_events_total", {"provider": "resend", "event": "delivered"}) == 1
    assert reg.get_sample_value("mailgenius_email_delivery_latency_seconds_count", {"provider": "resend"}) == 1


async def test_replayed_webhook_is_deduplicated(api, pool, send_ctx):
    cid, rows = await sent_campaign(api, pool, send_ctx)
    raw, headers = signed(event("email.delivered", rows[0]["provider_message_id"]), msg_id="msg_replay")
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    resp = await api.post("/webhooks/resend", data=raw, headers=headers)
    assert resp.status == 200 and (await resp.json())["duplicate"] is True
    assert await pool.fetchval("SELECT count(*) FROM email_events") == 1
    assert (await campaign(pool, cid))["delivered"] == 1
    assert api.registry.get_sample_value("mailgenius_email_events_total", {"provider": "resend", "event": "delivered"}) == 1


async def test_forged_stale_and_malformed_webhooks_record_nothing(api, pool, send_ctx):
    cid, rows = await sent_campaign(api, pool, send_ctx)
    pid = rows[0]["provider_message_id"]
    # forged: signed with another secret
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
    raw, headers = signed(event("email.bounced", pid), secret=other)
    resp = await api.post("/webhooks/resend", data=raw, headers=headers)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_signature"
    # tampered body under a valid signature
    raw, headers = signed(event("email.delivered", pid))
    resp = await api.post("/webhooks/resend", data=raw.replace(b"delivered", b"complained"), headers=headers)
    assert resp.status == 401
    # stale: timestamp 10 minutes old; and from the future
    for delta in (-600, 600):
        raw, headers = signed(event("email.bounced", pid), when=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delta))
        assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 401
    # missing headers
    assert (await api.post("/webhooks/resend", data=raw)).status == 401
    # malformed but correctly signed
    for bad in (b"not json", b"[1,2]", b'{"type": "email.bounced"}'):
        raw, headers = signed(bad)
        resp = await api.post("/webhooks/resend", data=raw, headers=headers)
        assert resp.status == 400, bad
    assert await pool.fetchval("SELECT count(*) FROM email_events") == 0
    c = await campaign(pool, cid)
    assert (c["bounced"], c["complained"], c["delivered"]) == (0, 0, 0)
    assert await pool.fetchval("SELECT count(*) FROM leads WHERE status <> 'active'") == 0


async def test_hard_bounce_and_complaint_suppress_the_lead(api, pool, send_ctx, fake_resend):
    cid, rows = await sent_campaign(api, pool, send_ctx)
    raw, headers = signed(event("email.bounced", rows[0]["provider_message_id"],
                                bounce={"type": "Permanent", "message": "no such user"}))
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    raw, headers = signed(event("email.complained", rows[1]["provider_message_id"]))
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    raw, headers = signed(event("email.bounced", rows[2]["provider_message_id"], bounce={"type": "Transient"}))
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    statuses = {r["id"]: r["status"] for r in await pool.fetch("SELECT id, status FROM leads")}
    assert statuses[rows[0]["lead_id"]] == "bounced"
    assert statuses[rows[1]["lead_id"]] == "complained"
    assert statuses[rows[2]["lead_id"]] == "active"  # a soft bounce does not suppress
    c = await campaign(pool, cid)
    assert (c["bounced"], c["complained"]) == (1, 1)
    # Then a later campaign never mails them
    fake_resend.reset()
    cid2 = await make_campaign(api)
    await campaigns.request_send(pool, cid2)
    await drain(send_ctx, pool, cid2)
    assert (await campaign(pool, cid2))["recipients"] == 1
    assert len(fake_resend.counts) == 1
    # nor a transactional email
    resp = await api.post("/api/emails", headers=api.h, json={
        "to": (await pool.fetchval("SELECT email FROM leads WHERE id = $1", rows[0]["lead_id"])),
        "from_email": "a@example.com", "subject": "s", "text": "t"})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "suppressed"


async def test_tracking_open_click_and_tampering(api, pool, send_ctx):
    cid, rows = await sent_campaign(api, pool, send_ctx)
    t = Tracker(TRACKING_SECRET.encode(), PUBLIC_URL)
    mid = rows[0]["id"]
    link_id = await pool.fetchval("SELECT id FROM links WHERE campaign_id = $1", cid)
    resp = await api.get(f"/t/o/{t.token('o', mid)}")
    assert resp.status == 200 and resp.content_type == "image/gif"
    resp = await api.get(f"/t/c/{t.token('c', mid, link_id)}", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "https://shop.example.com/sale"
    c = await campaign(pool, cid)
    assert (c["opened"], c["clicked"]) == (1, 1)

    def counted(ev: str) -> float | None:
        return api.registry.get_sample_value("mailgenius_email_events_total", {"provider": "resend", "event": ev})

    assert (counted("opened"), counted("clicked")) == (1, 1)
    # a second open is neither a campaign open nor a metric one (rates are unique opens / sent)
    await api.get(f"/t/o/{t.token('o', mid)}")
    assert (await campaign(pool, cid))["opened"] == 1 and counted("opened") == 1
    # Resend's own open and click tracking reports the same open again: stored, not counted twice
    for kind in ("email.opened", "email.clicked"):
        raw, headers = signed(event(kind, rows[0]["provider_message_id"]))
        assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    assert (counted("opened"), counted("clicked")) == (1, 1)
    c = await campaign(pool, cid)
    assert (c["opened"], c["clicked"]) == (1, 1)
    # tampering: a changed id, a changed mac, a link of another campaign, a foreign kind
    other = await make_campaign(api, html='<a href="https://evil.example.net/">x</a>')
    evil_link = await pool.fetchval("SELECT id FROM links WHERE campaign_id = $1", other)
    good = t.token("c", mid, link_id)
    bad_tokens = [
        good.replace(good.split(".")[0], format(mid + 1, "x"), 1),
        good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
        t.token("c", mid, evil_link),  # validly signed, but not this campaign's link
        t.token("o", mid, link_id),
        "1.1", "", "x" * 100,
    ]
    for tok in bad_tokens:
        resp = await api.get(f"/t/c/{tok}", allow_redirects=False)
        assert resp.status == 404, tok
        assert "Location" not in resp.headers
    evil = Tracker(b"another-secret", PUBLIC_URL).token("c", mid, evil_link)
    assert (await api.get(f"/t/c/{evil}", allow_redirects=False)).status == 404
    assert (await api.get(f"/t/o/{t.token('o', 10**9)}")).status == 404


async def test_one_click_unsubscribe(api, pool, send_ctx):
    cid, rows = await sent_campaign(api, pool, send_ctx)
    t = Tracker(TRACKING_SECRET.encode(), PUBLIC_URL)
    token = t.token("u", rows[0]["id"])
    resp = await api.get(f"/u/{token}")
    assert resp.status == 200 and "form" in await resp.text()
    assert await pool.fetchval("SELECT status FROM leads WHERE id = $1", rows[0]["lead_id"]) == "active"
    resp = await api.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert resp.status == 200
    assert await pool.fetchval("SELECT status FROM leads WHERE id = $1", rows[0]["lead_id"]) == "unsubscribed"
    assert (await api.post(f"/u/{token}x", data={})).status == 404
    assert (await api.post(f"/u/{t.token('o', rows[1]['id'])}", data={})).status == 404


async def test_webhook_payload_postgres_refuses_is_a_400(api, pool):
    raw, headers = signed(b'{"type": "email.opened", "data": {"email_id": "x\\u0000y"}}')
    resp = await api.post("/webhooks/resend", data=raw, headers=headers)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_webhook"
    assert await pool.fetchval("SELECT count(*) FROM email_events") == 0


async def test_webhook_for_an_unknown_email_is_recorded_unlinked(api, pool):
    raw, headers = signed(event("email.delivered", "not-ours"))
    resp = await api.post("/webhooks/resend", data=raw, headers=headers)
    assert resp.status == 200 and (await resp.json())["message_id"] is None
    assert await pool.fetchval("SELECT count(*) FROM email_events WHERE message_id IS NULL") == 1


async def test_a_bounce_reported_after_the_send_is_in_the_failures_report(api, pool, send_ctx):
    # Given a sent campaign, When Resend reports a hard bounce of one of its messages
    cid, rows = await sent_campaign(api, pool, send_ctx)
    raw, headers = signed(event("email.bounced", rows[0]["provider_message_id"]))
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    # and the same bounce again, and a soft bounce of another message
    raw, headers = signed(event("email.bounced", rows[0]["provider_message_id"]))
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    raw, headers = signed(event("email.bounced", rows[1]["provider_message_id"], bounce={"type": "Transient"}))
    assert (await api.post("/webhooks/resend", data=raw, headers=headers)).status == 200
    # Then the campaign's failures report lists the hard bounce once, as a bounce reported late
    resp = await api.get(f"/api/campaigns/{cid}/failures", headers=api.read_h)
    assert resp.status == 200, await resp.text()
    failures = (await resp.json())["failures"]
    assert [(f["message_id"], f["status"], f["reason"], f["stage"]) for f in failures] == [
        (rows[0]["id"], "bounced", "bounced", "report")]
