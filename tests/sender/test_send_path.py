"""The send path's Postgres shape (migration 0201) and its fast render: HOT updates, the side
tables that replaced indexes of messages, retry-failed in chunks, render equal to Jinja's own."""

from __future__ import annotations

import asyncio
import time

from mailgenius.cache import rkey
from sender import campaigns, templates
from sender.ledger import RECORD_SQL
from sender.sending import (
    CLAIM_SQL,
    STATS_FLUSH_SECONDS,
    send_campaign_batch,
    send_transactional,
)

from .conftest import add_leads, campaign, drain, make_campaign


async def _wait_for_no_older_transactions(conn, timeout: float = 60.0) -> None:
    """Until no session of the cluster runs a transaction, or holds a snapshot, that began before
    now. A snapshot's xmin is computed over every database, so another database's long
    transaction (a concurrent import, a dump) also keeps this one's dead versions unprunable."""
    horizon = await conn.fetchval("SELECT txid_current()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = await conn.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE pid <> pg_backend_pid()
                 AND greatest(age(backend_xid), age(backend_xmin)) >= age(($1::bigint % 4294967296)::text::xid)""",
            horizon)
        if holders == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"a transaction older than the claim ran for {timeout:.0f} s: cannot measure HOT updates")


async def test_claim_and_record_are_hot_updates(api, pool):
    # Given a written ledger of 100 recipients (one batch)
    await add_leads(pool, 100)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    xact_stats = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'messages'"
    async with pool.acquire() as conn:
        # When the batch is claimed, then recorded (70 sent, 30 failed), each in its own transaction
        # (as the send path does), reading pg_stat_xact_user_tables (this session's updates)
        async with conn.transaction():
            rows = await conn.fetch(CLAIM_SQL, cid, 0)  # also takes the batch's advisory lock
            claim = await conn.fetchrow(xact_stats)
        assert rows[0]["locked"] and len(rows) == 100
        ids = sorted(r["id"] for r in rows)
        sent, failed = ids[:70], ids[70:]
        # The record's new row versions fit on their pages only once the claim's old versions are
        # pruned (fillfactor 40 leaves room for one more version per row, not two), and pruning
        # waits for every transaction that began before the claim committed, in any database of
        # the cluster. Another test session's import or an autovacuum made 45 of the 100 updates
        # non-HOT in 4 runs of 15 on a busy machine: wait for them, so that what the test counts
        # is which columns the record touches, not what else the server is running.
        await _wait_for_no_older_transactions(conn)
        async with conn.transaction():
            row = await conn.fetchrow(RECORD_SQL, sent, [f"pid-{i}" for i in sent], failed,
                                      ["boom"] * len(failed), ["failed"] * len(failed), "resend", cid,
                                      [False] * len(failed), [None] * len(failed), [None] * len(failed),
                                      ["rejected"] * len(failed))
            record = await conn.fetchrow(xact_stats)
        await conn.execute("SELECT pg_advisory_unlock($1::int, 0)", cid)
    # Then every one of the 2 x 100 row updates was HOT (no index of messages touched)
    assert (row["sent"], row["failed"]) == (70, 30)
    # (Postgres 15 may still count the claim's transaction in the view: compare the difference)
    assert (claim["n_tup_upd"], claim["n_tup_hot_upd"]) == (100, 100)
    rec_upd, rec_hot = record["n_tup_upd"], record["n_tup_hot_upd"]
    if rec_upd == 200:
        rec_upd, rec_hot = rec_upd - 100, rec_hot - 100
    assert (rec_upd, rec_hot) == (100, 100)
    # And the side tables hold the provider ids and the failures
    pids = await pool.fetch("SELECT provider_message_id, message_id FROM message_provider_ids ORDER BY message_id")
    assert [(r["provider_message_id"], r["message_id"]) for r in pids] == [(f"pid-{i}", i) for i in sent]
    fails = await pool.fetch("SELECT message_id, campaign_id FROM message_failures ORDER BY message_id")
    assert [(r["message_id"], r["campaign_id"]) for r in fails] == [(i, cid) for i in failed]


async def test_messages_has_no_index_on_columns_the_send_path_updates(pool):
    # Given the migrated schema, Then no index of messages names status, provider_message_id,
    # attempts, sent_at, provider, last_error or updated_at (in its key or its predicate)
    defs = [r["indexdef"] for r in await pool.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'messages'")]
    for col in ("status", "provider_message_id", "attempts", "sent_at", "provider", "last_error", "updated_at",
                "retry_since"):
        assert not [d for d in defs if col in d], (col, defs)
    fillfactor = await pool.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'messages'")
    assert any(o.startswith("fillfactor=") and int(o.split("=")[1]) < 100 for o in fillfactor)


async def test_failures_pages_are_full_when_requeued_rows_sit_between_failed_ones(api, pool, send_ctx, fake_resend):
    # Given a campaign whose 6 recipients were rejected, then every other one requeued by
    # retry-failed (their report rows stay; the suppressed ones stay failed)
    leads = await add_leads(pool, 6, prefix="reject")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    ids = [await pool.fetchval("SELECT id FROM messages WHERE lead_id = $1", lead) for lead in leads]
    order = sorted(range(6), key=lambda i: ids[i])
    still_failed = [ids[i] for i in order[0::2]]
    await pool.execute("UPDATE leads SET status = 'unsubscribed' WHERE id = ANY($1::bigint[])",
                       [leads[i] for i in order[0::2]])
    await campaigns.retry_failed(pool, cid)
    assert await pool.fetchval("SELECT count(*) FROM message_refusals WHERE campaign_id = $1", cid) == 6
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'failed'",
                               cid) == 3
    # When the report is read 2 rows a page
    pages, after = [], 0
    while after is not None:
        r = await api.get(f"/api/campaigns/{cid}/failures", params={"limit": "2", "after": str(after)},
                          headers=api.read_h)
        assert r.status == 200, await r.text()
        body = await r.json()
        pages.append([f["message_id"] for f in body["failures"]])
        after = body["next_after"]
    # Then every page but the last is full, and each failed recipient is listed once
    assert pages == [still_failed[:2], still_failed[2:]]


async def test_retry_failed_works_in_chunks_and_is_repeatable(api, pool, send_ctx, fake_resend):
    # Given a sent campaign with 7 rejected recipients and one of them since unsubscribed
    await add_leads(pool, 5, prefix="ok")
    rejected = await add_leads(pool, 7, prefix="reject")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    c = await campaign(pool, cid)
    # (7 of 12 failed: above campaign_failed_share, so the outcome is failed)
    assert (c["sent"], c["failed"], c["status"]) == (5, 7, "failed")
    assert await pool.fetchval("SELECT count(*) FROM message_failures WHERE campaign_id = $1", cid) == 7
    await pool.execute("UPDATE leads SET status = 'unsubscribed' WHERE id = $1", rejected[0])
    # When retry-failed runs in chunks of 2 rows
    per, tx = await campaigns.retry_failed(pool, cid, chunk=2)
    # Then the 6 retryable rows are pending again, the suppressed one stays failed, counters agree
    assert list(per) == [cid] and tx == []
    c = await campaign(pool, cid)
    assert (c["failed"], c["queued"], c["status"]) == (1, 6, "sending")
    assert await pool.fetchval(
        "SELECT count(*) FROM messages WHERE campaign_id = $1 AND status = 'pending'", cid) == 6
    assert [r["message_id"] for r in await pool.fetch("SELECT message_id FROM message_failures")] == [
        await pool.fetchval("SELECT id FROM messages WHERE lead_id = $1", rejected[0])]
    # And a stale side-table row (a message no longer failed, or gone) is dropped, not retried
    sent_id = await pool.fetchval("SELECT id FROM messages WHERE campaign_id = $1 AND status = 'sent' LIMIT 1", cid)
    await pool.execute("INSERT INTO message_failures (message_id, campaign_id) VALUES ($1, $2), (999999, $2)",
                       sent_id, cid)
    # And repeating it moves nothing and counts nothing twice
    assert await campaigns.retry_failed(pool, cid, chunk=2) == ({}, [])
    assert (await campaign(pool, cid))["queued"] == 6
    assert await pool.fetchval("SELECT count(*) FROM message_failures WHERE message_id IN ($1, 999999)",
                               sent_id) == 0
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", sent_id) == "sent"
    # And the retried rows fail again through the normal path, back into message_failures
    for b in await campaigns.open_batches(pool, cid):
        await send_campaign_batch(send_ctx, cid, b)
    c = await campaign(pool, cid)
    assert (c["sent"], c["failed"], c["queued"], c["status"]) == (5, 7, 0, "failed")
    assert await pool.fetchval("SELECT count(*) FROM message_failures WHERE campaign_id = $1", cid) == 7
    assert fake_resend.stats()["duplicates"] == 0


async def test_webhook_lookup_by_provider_id_uses_the_side_table(api, pool, send_ctx, fake_resend):
    # Given a sent campaign, Then each sent message's provider id maps back to it
    await add_leads(pool, 3)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(send_ctx, pool, cid)
    rows = await pool.fetch(
        """SELECT m.id, m.provider_message_id, p.message_id FROM messages m
           LEFT JOIN message_provider_ids p ON p.provider_message_id = m.provider_message_id
           WHERE m.campaign_id = $1""", cid)
    assert len(rows) == 3 and all(r["provider_message_id"] and r["message_id"] == r["id"] for r in rows)


def test_fast_render_equals_jinja_render():
    # Given a campaign using every kind of variable, a loop, a filter and a tracked link
    subject = "Hi {{ first_name|title }} from {{ campaign.name }}"
    html = ('<html><body>{% for t in tags %}<i>{{ t }}</i>{% endfor %}{{ lead.attributes.city }} & '
            '{{ company }}<a href="https://shop.example.com/x">x</a><a href="{{ unsubscribe_url }}">u</a>'
            '</body></html>')
    text = "{{ last_name or 'friend' }} <{{ email }}> {% if attributes.plan == 'pro' %}pro{% endif %}"
    compiled = templates.compile_campaign(subject, html, text, {"https://shop.example.com/x": 3})
    lead = dict(templates.SAMPLE_LEAD, company="A<b>&Co", tags=["x<y", "z"])
    ctx = templates.lead_context(lead, campaign={"id": 1, "name": "N"}, unsubscribe_url="https://u.example/u/1",
                                 click_url=lambda link_id: f"https://t.example/c/{link_id}")
    # When rendered by the send path, Then the output is what Template.render gives for the same
    # templates with each tracked link written as a sandboxed {{ click_url(id) }} call
    reference_html = templates.HTML_ENV.from_string(
        html.replace("https://shop.example.com/x", "{{ click_url(3) }}")).render(ctx)
    assert templates.render(compiled, ctx) == (
        " ".join(compiled.subject.render(ctx).split()), reference_html, compiled.text.render(ctx))
    assert 'href="https://t.example/c/3"' in reference_html
    assert "A&lt;b&gt;&amp;Co" in reference_html


async def test_send_statistics_reach_redis_within_the_flush_interval(api, pool, send_ctx, fake_resend, redis_client,
                                                                    ssettings):
    async def totals(minute: int) -> list[int]:
        out = [0, 0]
        for m in (minute, minute + 1):
            sent, failed = await redis_client.hmget(rkey(ssettings, "sender", "stats", str(m)), "sent", "failed")
            out[0] += int(sent or 0)
            out[1] += int(failed or 0)
        return out

    # Given a campaign with 3 accepted and 2 rejected recipients (and the counts other tests left)
    await add_leads(pool, 3, prefix="ok")
    await add_leads(pool, 2, prefix="reject")
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    minute = int(time.time() // 60)
    before = await totals(minute)
    # When it is sent, Then within STATS_FLUSH_SECONDS the health check's counts in Redis grow by 3 and 2
    await drain(send_ctx, pool, cid)
    await asyncio.sleep(STATS_FLUSH_SECONDS + 0.5)
    after = await totals(minute)
    assert [after[0] - before[0], after[1] - before[1]] == [3, 2]


async def test_retry_failed_requeues_a_failed_transactional_email(api, pool, send_ctx, fake_resend):
    # Given a transactional email the provider refused (a per-email 4xx)
    resp = await api.post("/api/emails", json={"to": "reject-me@example.com", "from_email": "shop@example.com",
                                               "subject": "Receipt", "text": "Thanks"}, headers=api.h)
    assert resp.status in (200, 201, 202), await resp.text()
    mid = (await resp.json())["id"]
    await send_transactional(send_ctx, mid)
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", mid) == "failed"
    assert await pool.fetchval("SELECT campaign_id IS NULL FROM message_failures WHERE message_id = $1", mid)
    # When retry-failed runs for every campaign, Then the email is pending again and to be enqueued, once
    assert await campaigns.retry_failed(pool) == ({}, [mid])
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", mid) == "pending"
    assert await pool.fetchval("SELECT count(*) FROM message_failures") == 0
    assert await campaigns.retry_failed(pool) == ({}, [])
    # And a campaign-scoped retry-failed never touches transactional emails
    await send_transactional(send_ctx, mid)
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", mid) == "failed"
    cid = await make_campaign(api)
    assert await campaigns.retry_failed(pool, cid) == ({}, [])
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", mid) == "failed"


async def test_a_batch_held_by_another_worker_is_left_alone_and_locks_are_released(api, pool, send_ctx, fake_resend):
    # Given a written ledger of two batches, batch 0's advisory lock held by another session (a live worker)
    await add_leads(pool, 150)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await campaigns.write_ledger(pool, cid)
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1::int, 0)", cid)
        # When this worker gets the batch, Then it claims nothing and sends nothing
        out = await send_campaign_batch(send_ctx, cid, 0)
        assert out.detail == "locked" and out.sent == 0
        rows = await pool.fetch("SELECT status, attempts FROM messages WHERE campaign_id = $1 AND batch = 0", cid)
        assert {(r["status"], r["attempts"]) for r in rows} == {("pending", 0)}
        assert fake_resend.stats()["emails"] == 0
        await holder.execute("SELECT pg_advisory_unlock($1::int, 0)", cid)
    # When the lock is free, Then the batch is sent once, and a redelivery finds nothing to send
    assert (await send_campaign_batch(send_ctx, cid, 0)).sent == 100
    assert (await send_campaign_batch(send_ctx, cid, 0)).detail == "nothing to send"
    assert (await send_campaign_batch(send_ctx, cid, 1)).sent == 50
    assert (await send_campaign_batch(send_ctx, cid, 1)).detail == "campaign sent"
    assert fake_resend.stats()["emails"] == 150 and fake_resend.stats()["duplicates"] == 0
    # And no session still holds the batch's lock
    assert await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 AND objid IN (0, 1)"
        # pg_locks is cluster-wide: another database's campaign 1 (a concurrent test session,
        # another stack on the same server) must not count
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())", cid) == 0
