"""The SMTP provider against real relays (aiosmtpd, sender.testing.TestRelay): replies classified
per recipient and stage, SMTPUTF8 on and off, 421 / drops close the connection, the pool bounds
the connections a relay sees; and the whole send path: hard bounces suppress the lead in the same
record, the failures report lists every failed recipient with reason, stage and code."""

from __future__ import annotations

import asyncio
import csv
import io
import time

import pytest
from prometheus_client import CollectorRegistry

from sender.email_settings import mirror
from sender.metrics import SenderMetrics
from sender.providers import OutEmail, SmtpProvider, is_hard_bounce
from sender.sending import SendContext
from sender.testing import TestRelay

from .conftest import campaign, drain, make_campaign


def out(i: int, to: str) -> OutEmail:
    return OutEmail(i, to, "News <news@example.com>", f"subject {i}", "<p>hello</p>", "hello",
                    {"List-Unsubscribe": "<http://x/u/1>"})


async def settle(relay: TestRelay, provider: SmtpProvider, timeout: float = 5.0) -> None:
    """Wait until the relay has seen every connection we closed go away."""
    end = time.monotonic() + timeout
    while relay.open != provider.pool.open and time.monotonic() < end:
        await asyncio.sleep(0.02)
    assert relay.open == provider.pool.open, (relay.open, provider.pool.open)


@pytest.fixture
def relay_no_utf8():
    with TestRelay(smtputf8=False) as relay:
        yield relay


RECIPIENTS = {
    1: "ok1@example.com",
    2: "unknown.user@example.com",      # 550 5.1.1 at RCPT: hard bounce
    3: "policy@example.com",            # 550 5.7.1 at RCPT: failed, not a bounce
    4: "full@example.com",              # 552 at DATA: failed
    5: "grey@example.com",              # 451 at RCPT: retried
    6: "busy@example.com",              # 421: retried, the connection is closed
    7: "drop@example.com",              # dropped after the body: retried
    8: "otávio.carvalho@example.com",   # non-ASCII local part, relay without SMTPUTF8
    9: "ok2@exämple.com",               # non-ASCII domain: IDNA, any relay takes it
    10: "ok3@example.com",
}


async def test_replies_are_classified_per_recipient_and_stage(relay_no_utf8):
    relay = relay_no_utf8
    p = SmtpProvider("127.0.0.1", relay.port, pool_size=3, opportunistic_tls=False)
    try:
        res = await p.send_batch([out(i, to) for i, to in RECIPIENTS.items()], "k")
        # Then the accepted ones are accepted, refusals are permanent and classified by stage...
        assert sorted(res.accepted) == [1, 9, 10], res
        assert set(res.rejected) == {2, 3, 4, 8}, res.rejected
        assert res.bounced == {2}
        assert res.rejected[2][0] == "bounced" and "5.1.1" in res.rejected[2][1]
        assert res.rejected[3][0] == "rejected" and res.rejected[3][1].startswith("550 5.7.1")
        assert res.rejected[4][0] == "rejected" and res.rejected[4][1].startswith("552")
        # ...the non-ASCII recipient fails at once with a clear reason (never "connection")
        assert res.rejected[8][0] == "smtputf8" and "SMTPUTF8" in res.rejected[8][1]
        assert res.details[2] == ("RCPT", 550) and res.details[3] == ("RCPT", 550)
        assert res.details[4] == ("DATA", 552)
        # ...4xx, 421 and a drop are retried; the 421 counts as the relay's trouble (rate_limited)
        assert sorted(res.retry) == [5, 6, 7]
        assert res.details[5] == ("RCPT", 451) and res.details[6] == ("RCPT", 421)
        assert res.call_error == "rate_limited" and res.error.reason == "rate_limited"
        # ...and nothing is left open beyond the pool, every dropped connection closed
        await settle(relay, p)
        assert relay.peak <= 3 and p.pool.peak <= 3
        assert relay.delivered["ok2@xn--exmple-cua.com"] == 1

        # When the retried ones are sent again, they go through, each exactly once
        res2 = await p.send_batch([out(i, RECIPIENTS[i]) for i in res.retry], "k")
        assert sorted(res2.accepted) == [5, 6, 7] and not res2.retry and not res2.rejected
        assert res2.call_error is None
        assert relay.duplicates() == 0
        assert sum(relay.delivered.values()) == 6
    finally:
        await p.close()
    await settle(relay, p)
    assert relay.open == 0


async def test_permanent_refusals_alone_are_not_a_provider_error(relay_no_utf8):
    p = SmtpProvider("127.0.0.1", relay_no_utf8.port, pool_size=2, opportunistic_tls=False)
    try:
        res = await p.send_batch([out(i, f"unknown{i}@example.com") for i in range(1, 6)]
                                 + [out(6, "josé@example.com"), out(7, "policy@example.com")], "k")
        assert set(res.rejected) == set(range(1, 8)) and not res.retry
        assert res.call_error is None and res.error is None
    finally:
        await p.close()


async def test_smtputf8_relay_takes_non_ascii_local_parts():
    with TestRelay(smtputf8=True, keep=True) as relay:
        p = SmtpProvider("127.0.0.1", relay.port, pool_size=2, opportunistic_tls=False)
        try:
            res = await p.send_batch([out(1, "otávio.carvalho@example.com"), out(2, "plain@example.com")], "k")
        finally:
            await p.close()
        assert sorted(res.accepted) == [1, 2], res
        assert relay.delivered["otávio.carvalho@example.com"] == 1


async def test_the_pool_bounds_the_connections_a_relay_sees():
    with TestRelay(smtputf8=False, delay=0.005) as relay:
        gauge: list[int] = []
        base = relay.connections  # aiosmtpd's controller connects once to itself at start
        p = SmtpProvider("127.0.0.1", relay.port, pool_size=4, opportunistic_tls=False,
                         on_connections=lambda r, n: gauge.append(n))
        try:
            emails = [out(i, ("unknown" if i % 7 == 0 else "r") + f"{i}@example.com") for i in range(1, 301)]
            results = await asyncio.gather(*(p.send_batch(emails[k:k + 100], "k") for k in range(0, 300, 100)))
            accepted = sum(len(r.accepted) for r in results)
            assert accepted == 300 - 300 // 7
            assert relay.peak <= 4 and max(gauge) <= 4, (relay.peak, max(gauge))
            assert relay.connections - base <= 4  # refusals reset and reuse the connection
        finally:
            await p.close()
        await settle(relay, p)
        assert gauge[-1] == 0 and relay.open == 0


async def test_a_relay_that_drops_every_connection_leaks_none():
    rules = {"": ("DATA", "DROP", None)}  # every recipient: dropped after the body, always
    with TestRelay(smtputf8=True, rules=rules) as relay:
        p = SmtpProvider("127.0.0.1", relay.port, pool_size=3, opportunistic_tls=False)
        for _ in range(3):
            res = await p.send_batch([out(i, f"r{i}@example.com") for i in range(1, 21)], "k")
            assert sorted(res.retry) == list(range(1, 21)) and res.call_error == "connection"
        await settle(relay, p)
        assert p.pool.open == 0 and relay.open == 0 and relay.peak <= 3
        await p.close()


def test_hard_bounce_classification():
    assert is_hard_bounce(550, "5.1.1 <a@b>: Recipient address rejected: User unknown", "RCPT")
    assert is_hard_bounce(550, "5.2.1 mailbox disabled", "DATA")
    assert is_hard_bounce(550, "5.1.10 null MX", "RCPT")
    assert not is_hard_bounce(550, "5.7.1 rejected under policy", "RCPT")
    assert not is_hard_bounce(553, "5.1.8 sender address domain does not exist", "RCPT")
    assert not is_hard_bounce(450, "4.1.1 try later", "RCPT")
    assert not is_hard_bounce(550, "relaying denied", "RCPT")  # no code, no mailbox wording
    assert is_hard_bounce(550, "No such user here", "RCPT")
    assert not is_hard_bounce(550, "5.1.1 user unknown", "MAIL")


# -- the whole send path ---------------------------------------------------------------------

@pytest.fixture
async def smtp_ctx(pool, redis_client, ssettings, tmp_path):
    relay = TestRelay(smtputf8=False).start()
    settings = ssettings.replace(email_provider="smtp", smtp_host="127.0.0.1", smtp_port=relay.port,
                                 data_dir=str(tmp_path))
    registry = CollectorRegistry()
    ctx = await SendContext(pool, redis_client, settings, SenderMetrics(registry)).start()
    ctx.registry = registry
    ctx.relay = relay
    await mirror(redis_client, settings, {"provider": "smtp", "rate_limit": 0})  # this test's Redis prefix
    yield ctx
    await ctx.close()
    relay.stop()


async def add_named_leads(pool, emails: list[str], tag: str) -> None:
    await pool.execute("INSERT INTO leads (email, tags) SELECT e, ARRAY[$2] FROM unnest($1::text[]) e",
                       emails, tag)


async def test_hard_bounces_suppress_the_lead_and_the_failures_report_lists_them(api, smtp_ctx, pool):
    ctx = smtp_ctx
    tag = f"smtp{time.time_ns()}"
    good = [f"fine{i}-{tag}@example.com" for i in range(60)]  # 5 failed of 65: below the failed share
    unknown = [f"unknown{i}-{tag}@example.com" for i in range(3)]
    policy = [f"policy-{tag}@example.com"]
    utf8 = [f"zoë-{tag}@example.com"]
    await add_named_leads(pool, good + unknown + policy + utf8, tag)
    assert (await ctx.provider()).name == "smtp"
    cid = await make_campaign(api, segment={"tags": [tag]})
    assert (await api.post(f"/api/campaigns/{cid}/send", headers=api.h)).status == 202
    await drain(ctx, pool, cid)

    # Then the campaign is done: sent 60, failed 5 of which 3 are hard bounces
    c = await campaign(pool, cid)
    assert (c["status"], c["sent"], c["failed"], c["bounced"], c["queued"]) == ("sent", 60, 5, 3, 0), c
    # ...the bounced leads are suppressed (in the same record), the others stay active
    statuses = dict(await pool.fetch("SELECT email, status FROM leads WHERE email = ANY($1::text[])",
                                     unknown + policy + utf8))
    assert all(statuses[e] == "bounced" for e in unknown), statuses
    assert statuses[policy[0]] == "active" and statuses[utf8[0]] == "active"
    rows = await pool.fetch("SELECT email, status, delivery FROM messages WHERE campaign_id = $1 AND status = 'failed'",
                            cid)
    assert {r["email"] for r in rows if r["delivery"] == "bounced"} == set(unknown)
    # ...and nothing of it counted as a provider error
    errors = sum(s.value for m in ctx.registry.collect() if m.name == "mailgenius_provider_errors"
                 for s in m.samples if s.name.endswith("_total"))
    assert errors == 0
    assert ctx.registry.get_sample_value("mailgenius_email_events_total",
                                         {"provider": "smtp", "event": "bounced"}) == 3
    # ...and the gauge shows the connections the pool holds open to the relay, within its bound
    provider = await ctx.provider()
    gauge = ctx.registry.get_sample_value("mailgenius_smtp_connections",
                                          {"provider": "smtp", "relay": f"127.0.0.1:{ctx.relay.port}"})
    assert gauge == provider.pool.open and 1 <= gauge <= provider.pool.size
    assert ctx.relay.peak <= provider.pool.size

    # The failures report: every failed recipient, reason, stage, code; paged by keyset
    r = await api.get(f"/api/campaigns/{cid}/failures", params={"limit": "2"}, headers=api.read_h)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert len(body["failures"]) == 2 and body["next_after"]
    seen = list(body["failures"])
    while body["next_after"]:
        body = await (await api.get(f"/api/campaigns/{cid}/failures",
                                    params={"limit": "2", "after": str(body["next_after"])},
                                    headers=api.read_h)).json()
        seen += body["failures"]
    by_email = {f["email"]: f for f in seen}
    assert set(by_email) == set(unknown + policy + utf8)
    assert by_email[unknown[0]]["status"] == "bounced" and by_email[unknown[0]]["stage"] == "RCPT"
    assert by_email[unknown[0]]["smtp_code"] == 550 and "5.1.1" in by_email[unknown[0]]["error"]
    assert by_email[policy[0]]["status"] == "failed" and by_email[policy[0]]["reason"] == "rejected"
    assert by_email[utf8[0]]["reason"] == "smtputf8" and "SMTPUTF8" in by_email[utf8[0]]["error"]

    # ...as CSV, both spellings
    for url, params in ((f"/api/campaigns/{cid}/failures", {"format": "csv"}),
                        (f"/api/campaigns/{cid}/failures.csv", {})):
        r = await api.get(url, params=params, headers=api.read_h)
        assert r.status == 200 and r.content_type == "text/csv"
        table = list(csv.DictReader(io.StringIO(await r.text())))
        assert {row["email"] for row in table} == set(by_email)
        assert {row["stage"] for row in table if row["email"] in unknown} == {"RCPT"}
    # ...scoped and validated like the other campaign reads
    assert (await api.get(f"/api/campaigns/{cid}/failures")).status == 401
    assert (await api.get(f"/api/campaigns/{cid}/failures", params={"limit": "0"}, headers=api.read_h)).status == 422
    assert (await api.get(f"/api/campaigns/{cid}/failures", params={"after": "x"}, headers=api.read_h)).status == 422
    assert (await api.get(f"/api/campaigns/{cid}/failures", params={"format": "xml"},
                          headers=api.read_h)).status == 422
    assert (await api.get("/api/campaigns/999999999/failures", headers=api.read_h)).status == 404

    # A second campaign to the same segment does not mail the bounced leads again
    before = sum(ctx.relay.attempts[("RCPT", e.lower())] for e in unknown)
    cid2 = await make_campaign(api, segment={"tags": [tag]})
    assert (await api.post(f"/api/campaigns/{cid2}/send", headers=api.h)).status == 202
    await drain(ctx, pool, cid2)
    assert sum(ctx.relay.attempts[("RCPT", e.lower())] for e in unknown) == before
    assert all(ctx.relay.delivered[g.lower()] == 2 for g in good)  # each campaign once
