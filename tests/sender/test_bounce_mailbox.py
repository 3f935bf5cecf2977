"""The bounce mailbox: RFC 3464 DSNs and RFC 5965 ARF complaint reports, written as MTAs and
feedback loops write them (with the email package, around the very messages our SMTP provider
sent to a local relay), served by a local POP3 and a local IMAP server, read by the poller: message, lead,
campaign counters and metrics change exactly once across polls, replays and a mailbox that drops
the connection mid-poll."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from prometheus_client import CollectorRegistry

from sender import campaigns, dsn
from sender.mailbox import MailboxConfig, MailboxPoller
from sender.metrics import SenderMetrics
from sender.sending import SendContext
from sender.sink import start_sink
from tests.conftest import free_port

from .conftest import add_leads, campaign, drain, make_campaign, wait_for
from .imap_server import ImapServer
from .pop3_server import Pop3Server

SECRET = b"test-verp-secret"
BOUNCE_BOX = "bounces@news.example.com"


# -- reports as mail servers write them ----------------------------------------------------------

def _block(**fields) -> Message:
    m = Message()
    for k, v in fields.items():
        m[k.replace("_", "-")] = v
    return m


def make_dsn(original: bytes | None, recipient: str, *, action="failed", status="5.1.1",
             diagnostic="smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
             to=BOUNCE_BOX, headers_only=False, msgid=None, note="") -> bytes:
    """A Postfix-style non-delivery report (RFC 3464)."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "MAILER-DAEMON@mx.example.org (Mail Delivery System)"
    report["To"] = to
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(localtime=False)
    report["Message-ID"] = msgid or email.utils.make_msgid(domain="mx.example.org")
    report["Auto-Submitted"] = "auto-replied"
    report.attach(MIMEText("This is the mail system at host mx.example.org.\n\n"
                           "I'm sorry to have to inform you that your message could not\n"
                           "be delivered to one or more recipients.\n" + note))
    ds = MIMEBase("message", "delivery-status")
    ds.set_payload([
        _block(Reporting_MTA="dns; mx.example.org", X_Postfix_Queue_ID="4Qx1", Arrival_Date=report["Date"]),
        _block(Final_Recipient=f"rfc822; {recipient}", Original_Recipient=f"rfc822;{recipient}",
               Action=action, Status=status, Remote_MTA="dns; mailbox.example.org",
               Diagnostic_Code=diagnostic.format(rcpt=recipient)),
    ])
    del ds["MIME-Version"]
    report.attach(ds)
    if original is not None:
        orig = email.message_from_bytes(original, policy=email.policy.compat32)
        if headers_only:
            hdrs = "".join(f"{k}: {v}\n" for k, v in orig.items())
            part = MIMEText(hdrs, "rfc822-headers")
        else:
            part = MIMEMessage(orig)
        del part["MIME-Version"]
        report.attach(part)
    return report.as_bytes()


def make_arf(original: bytes, recipient: str | None, *, feedback_type="abuse", return_path=None) -> bytes:
    """A Yahoo-style abuse report (RFC 5965) with the reported message."""
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = "feedback@arf.mail.yahoo.com"
    report["To"] = "fbl@news.example.com"
    report["Subject"] = "FW: Hello"
    report["Date"] = email.utils.formatdate(localtime=False)
    report["Message-ID"] = email.utils.make_msgid(domain="arf.mail.yahoo.com")
    report.attach(MIMEText("This is an email abuse report for an email message received from IP 192.0.2.1\n"))
    fields = {"Feedback_Type": feedback_type, "User_Agent": "Yahoo!-Mail-Feedback/2.0", "Version": "1",
              "Original_Mail_From": "<news@example.com>", "Arrival_Date": report["Date"],
              "Reported_Domain": "example.com", "Source_IP": "192.0.2.1"}
    if recipient:
        fields["Original_Rcpt_To"] = recipient
    fr = MIMEBase("message", "feedback-report")
    fr.set_payload([_block(**fields)])
    del fr["MIME-Version"]
    report.attach(fr)
    orig = email.message_from_bytes(original, policy=email.policy.compat32)
    if return_path:
        orig["Return-Path"] = f"<{return_path}>"
    part = MIMEMessage(orig)
    del part["MIME-Version"]
    report.attach(part)
    return report.as_bytes()


def out_of_office(to=BOUNCE_BOX) -> bytes:
    m = MIMEText("I am out of the office until Monday.")
    m["From"] = "ana@example.org"
    m["To"] = to
    m["Subject"] = "Out of office"
    m["Message-ID"] = email.utils.make_msgid(domain="example.org")
    return m.as_bytes()


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture
def relay():
    controller, handler = start_sink("127.0.0.1", free_port())
    yield handler, controller.port
    controller.stop()


@pytest.fixture
async def smtp_ctx(pool, redis_client, ssettings, relay):
    _handler, port = relay
    settings = ssettings.replace(email_provider="smtp", smtp_host="127.0.0.1", smtp_port=port)
    registry = CollectorRegistry()
    ctx = await SendContext(pool, redis_client, settings, SenderMetrics(registry)).start()
    ctx.registry = registry
    yield ctx
    await ctx.close()


@pytest.fixture(params=["pop3", "imap"])
async def box(request):
    """The bounce mailbox, served over POP3 and over IMAP."""
    server = await (Pop3Server() if request.param == "pop3" else ImapServer()).start()
    server.protocol = request.param
    yield server
    await server.stop()


@pytest.fixture
def poller(pool, box):
    registry = CollectorRegistry()
    p = MailboxPoller(MailboxConfig("127.0.0.1", box.port, "bounces", "secret", "none", 1.0, box.protocol), pool,
                      SenderMetrics(registry), SECRET)
    p.registry = registry
    return p


async def smtp_campaign(api, pool, ctx, relay, n: int) -> tuple[int, dict[str, tuple[int, int, bytes]]]:
    """A campaign sent over SMTP to the local relay; returns {email: (message id, lead id, raw sent)}."""
    resp = await api.put("/api/settings/email", json={"provider": "smtp"}, headers=api.h)
    assert resp.status == 200, await resp.text()
    await add_leads(pool, n)
    cid = await make_campaign(api)
    await campaigns.request_send(pool, cid)
    await drain(ctx, pool, cid)
    handler, _port = relay
    raw_by = {rcpts[0]: data for _f, rcpts, data in handler.messages}
    rows = await pool.fetch("SELECT id, lead_id, email, status FROM messages WHERE campaign_id = $1 ORDER BY id", cid)
    assert [r["status"] for r in rows] == ["sent"] * n
    return cid, {r["email"]: (r["id"], r["lead_id"], raw_by[r["email"]]) for r in rows}


def events(registry, provider="smtp") -> dict[str, float]:
    return {e: registry.get_sample_value("mailgenius_email_events_total", {"provider": provider, "event": e})
            for e in ("bounced", "complained", "delivered", "delivery_delayed")}


async def state(pool, mid: int, lead: int) -> tuple:
    return (await pool.fetchval("SELECT delivery FROM messages WHERE id = $1", mid),
            await pool.fetchval("SELECT status FROM leads WHERE id = $1", lead))


# -- tests -------------------------------------------------------------------------------------------

async def test_dsn_and_arf_from_the_mailbox_apply_exactly_once(api, pool, smtp_ctx, relay, box, poller):
    # Given a campaign sent over SMTP, and a bounce mailbox holding what came back for it
    cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 5)
    (a, (ma, la, ra)), (b, (mb, lb, rb)), (c, (mc, lc, rc)), (d, (md, ld, rd)), _e = sorted(sent.items())
    hard = make_dsn(ra, a)                                                       # 5.1.1, whole message returned
    box.deliver(hard)
    box.deliver(make_dsn(rb, b, status="5.2.2", headers_only=True,              # mailbox full: soft
                          diagnostic="smtp; 552 5.2.2 <{rcpt}>: Mailbox full"))
    box.deliver(make_arf(rc, c))                                                # Yahoo abuse report
    box.deliver(make_dsn(rd, "someone-else@example.net"))                       # names another recipient
    box.deliver(out_of_office())                                                # not a report
    # When the poller reads the mailbox
    res = await poller.poll_once()
    # Then each report changed its message, lead and campaign once
    assert (res.messages, res.findings, res.applied, res.skipped, res.deleted) == (5, 4, 3, 1, 4)
    assert await state(pool, ma, la) == ("bounced", "bounced")
    assert await state(pool, mb, lb) == ("soft_bounced", "active")
    assert await state(pool, mc, lc) == ("complained", "complained")
    assert await state(pool, md, ld) == (None, "active")
    camp = await campaign(pool, cid)
    assert (camp["bounced"], camp["complained"]) == (1, 1)
    # And the same metrics as Resend's events, under the provider that sent them
    assert events(poller.registry) == {"bounced": 2, "complained": 1, "delivered": 0, "delivery_delayed": 0}
    rep = {o: poller.registry.get_sample_value("mailgenius_bounce_reports_total", {"source": s, "outcome": o})
           for s, o in [("dsn", "applied"), ("dsn", "unmatched"), ("dsn", "invalid")]}
    assert rep == {"applied": 2, "unmatched": 1, "invalid": 1}
    # And every report is stored (the one about another recipient unlinked), the reports are
    # deleted from the mailbox, the out-of-office reply is left for a person
    rows = await pool.fetch("SELECT provider, type, message_id FROM email_events ORDER BY id")
    assert [(r["provider"], r["type"], r["message_id"]) for r in rows] == [
        ("dsn", "dsn.failed", ma), ("dsn", "dsn.failed", mb), ("arf", "arf.abuse", mc), ("dsn", "dsn.failed", None)]
    assert len(box.maildrop) == 1 and b"Out of office" in next(iter(box.maildrop.values()))

    # When the mailbox is polled again, and then the hard bounce arrives a second time
    res2 = await poller.poll_once()
    assert (res2.messages, res2.deleted) == (0, 0)
    box.deliver(hard)
    res3 = await poller.poll_once()
    # Then the replay is read, recognised and deleted, and changes nothing
    assert (res3.messages, res3.findings, res3.duplicates, res3.applied, res3.deleted) == (1, 1, 1, 0, 1)
    camp = await campaign(pool, cid)
    assert (camp["bounced"], camp["complained"]) == (1, 1)
    assert events(poller.registry) == {"bounced": 2, "complained": 1, "delivered": 0, "delivery_delayed": 0}
    assert await pool.fetchval("SELECT count(*) FROM email_events") == 4
    # And the next campaign skips the suppressed leads
    cid2 = await make_campaign(api)
    await campaigns.request_send(pool, cid2)
    await drain(smtp_ctx, pool, cid2)
    assert (await campaign(pool, cid2))["recipients"] == 3


async def test_a_mailbox_dropping_mid_poll_loses_nothing_and_counts_nothing_twice(api, pool, smtp_ctx, relay,
                                                                                  box, poller):
    # Given two hard bounces in the mailbox, and a server that drops the session after one RETR
    cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 2)
    (a, (ma, _la, ra)), (b, (mb, _lb, rb)) = sorted(sent.items())
    box.deliver(make_dsn(ra, a))
    box.deliver(make_dsn(rb, b))
    box.drop_after_retr = 1
    # When a poll breaks after the first report was committed
    with pytest.raises(Exception):  # noqa: B017 - poplib raises whatever the broken socket gives
        await poller.poll_once()
    # Then the first bounce is applied, and nothing was removed (POP3: no QUIT; IMAP: no EXPUNGE)
    assert (await campaign(pool, cid))["bounced"] == 1
    assert len(box.maildrop) == 2
    # When the next poll runs
    box.drop_after_retr = None
    res = await poller.poll_once()
    # Then (POP3) both are read again, the first a duplicate; (IMAP) the first, flagged \Deleted
    # after its commit, is not listed again; both are gone, each counted once
    expect = (2, 1, 1, 2) if box.protocol == "pop3" else (1, 0, 1, 1)
    assert (res.findings, res.duplicates, res.applied, res.deleted) == expect
    assert box.maildrop == {}
    assert (await campaign(pool, cid))["bounced"] == 2
    assert events(poller.registry)["bounced"] == 2
    assert await pool.fetchval("SELECT count(*) FROM messages WHERE delivery = 'bounced'") == 2


async def test_verp_return_path_matches_and_cannot_be_forged(api, pool, smtp_ctx, relay, box, poller):
    # Given a DSN sent back to our signed VERP address, naming a forwarded address and no message
    cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 3)
    (_a, (ma, la, _ra)), (_b, (mb, lb, _rb)), (c, (mc, lc, rc)) = sorted(sent.items())
    verp = dsn.verp_address(SECRET, ma, "news.example.com")
    assert dsn.parse_verp(SECRET, verp.upper()) == ma  # an MTA that folds case keeps it valid
    # (with a 5,000-character line in its text, longer than poplib accepts by default)
    box.deliver(make_dsn(None, "forwarded@elsewhere.example", to=verp, note="x" * 5000 + "\n"))
    # And one to a VERP address with a forged mac, for another message
    forged = f"bounces+{mb}-{'0' * 16}@news.example.com"
    assert dsn.parse_verp(SECRET, forged) is None
    box.deliver(make_dsn(None, "x@elsewhere.example", to=forged))
    # And an abuse report whose recipient is redacted, matched by the Return-Path the receiving
    # MTA wrote into the reported message
    box.deliver(make_arf(rc, None, return_path=dsn.verp_address(SECRET, mc, "news.example.com")))
    # When polled
    await poller.poll_once()
    # Then the signed ones applied, the forged one did not
    assert await state(pool, ma, la) == ("bounced", "bounced")
    assert await state(pool, mb, lb) == (None, "active")
    assert await state(pool, mc, lc) == ("complained", "complained")
    assert c  # (the complaint's recipient was never named)


async def test_with_a_bounce_domain_the_envelope_is_the_signed_verp_address(api, pool, smtp_ctx, relay, box):
    # Given a sender whose bounce domain is set (MAILGENIUS_BOUNCE_DOMAIN)
    smtp_ctx.settings = smtp_ctx.settings.replace(bounce_domain="bounces.example.com")
    # When a campaign goes out over SMTP
    _cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 3)
    handler, _port = relay
    # Then every envelope sender (MAIL FROM, where MTAs send DSNs) is the message's signed VERP
    # address, and the From header is untouched
    envelope = {rcpts[0]: mail_from for mail_from, rcpts, _data in handler.messages}
    for address, (mid, _lead, raw) in sent.items():
        assert envelope[address] == dsn.verp_address(smtp_ctx.verp_secret, mid, "bounces.example.com")
        assert dsn.parse_verp(smtp_ctx.verp_secret, envelope[address]) == mid
        assert email.message_from_bytes(raw)["From"] != envelope[address]
    # And a DSN that comes back to that address, naming a forwarded recipient and without the
    # returned message (no Message-ID to go by), bounces exactly its message
    (_a, (ma, la, _ra)), (_b, (mb, lb, _rb)) = sorted(sent.items())[:2]
    box.deliver(make_dsn(None, "forwarded@elsewhere.example", to=envelope[_a]))
    poller = MailboxPoller(MailboxConfig("127.0.0.1", box.port, "bounces", "secret", "none", 1.0, box.protocol), pool,
                           SenderMetrics(CollectorRegistry()), smtp_ctx.verp_secret)
    await poller.poll_once()
    assert await state(pool, ma, la) == ("bounced", "bounced")
    assert await state(pool, mb, lb) == (None, "active")


async def test_without_a_bounce_domain_the_envelope_is_the_from_address(api, pool, smtp_ctx, relay):
    _cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 2)
    handler, _port = relay
    for mail_from, _rcpts, data in handler.messages:
        assert mail_from == email.utils.parseaddr(email.message_from_bytes(data)["From"])[1]


def test_dsn_classification_follows_rfc3463():
    assert dsn.classify("failed", "5.1.1") == ("bounced", True)
    assert dsn.classify("failed", "5.1.10") == ("bounced", True)
    assert dsn.classify("failed", "5.2.1") == ("bounced", True)
    assert dsn.classify("failed", "5.2.2") == ("bounced", False)   # mailbox full
    assert dsn.classify("failed", "5.7.1") == ("bounced", False)   # policy: the lead stays
    assert dsn.classify("failed", "4.4.7") == ("bounced", False)
    assert dsn.classify("delayed", "4.4.1") == ("delivery_delayed", False)
    assert dsn.classify("delivered", "2.0.0") == ("delivered", False)
    with pytest.raises(dsn.ReportError):
        dsn.parse(out_of_office())


async def test_the_sender_worker_polls_the_mailbox(api, pool, smtp_ctx, relay, box, workers):
    # Given a bounce in the mailbox for a message sent over SMTP
    cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 2)
    (a, (ma, la, ra)), _b = sorted(sent.items())
    box.deliver(make_dsn(ra, a))
    # When a real sender worker runs with the mailbox configured
    workers.start(processes=1, threads=1, MAILGENIUS_BOUNCE_MAILBOX_HOST="127.0.0.1",
                  MAILGENIUS_BOUNCE_MAILBOX_PROTOCOL=box.protocol,
                  MAILGENIUS_BOUNCE_MAILBOX_PORT=str(box.port), MAILGENIUS_BOUNCE_MAILBOX_USER="bounces",
                  MAILGENIUS_BOUNCE_MAILBOX_PASSWORD="secret", MAILGENIUS_BOUNCE_MAILBOX_TLS="none",
                  MAILGENIUS_BOUNCE_MAILBOX_INTERVAL="1")

    # Then its poller applies the bounce and empties the mailbox
    async def done():
        return box.maildrop == {} and await state(pool, ma, la) == ("bounced", "bounced")

    try:
        await wait_for(done, 30, what="the worker's mailbox poll")
    except AssertionError:
        raise AssertionError(workers.logs()) from None
    assert (await campaign(pool, cid))["bounced"] == 1


async def test_postgres_down_mid_poll_deletes_nothing_it_did_not_commit(api, pool, smtp_ctx, relay, box, poller,
                                                                        database_url):
    # Given a hard bounce in the mailbox, and Postgres unreachable for the poller
    import asyncpg

    cid, sent = await smtp_campaign(api, pool, smtp_ctx, relay, 1)
    (a, (ma, la, ra)), = sent.items()
    box.deliver(make_dsn(ra, a))
    dead = await asyncpg.create_pool(database_url, min_size=0, max_size=1)
    await dead.close()
    poller.pool = dead
    # When it polls
    with pytest.raises(asyncpg.exceptions.InterfaceError):
        await poller.poll_once()
    # Then the session ended cleanly (QUIT / LOGOUT) but the report is still in the mailbox
    assert box.quits == 1 and len(box.maildrop) == 1
    assert await state(pool, ma, la) == (None, "active")
    # And once Postgres is back the next poll applies it and only then deletes it
    poller.pool = pool
    res = await poller.poll_once()
    assert (res.applied, res.deleted) == (1, 1) and box.maildrop == {}
    assert await state(pool, ma, la) == ("bounced", "bounced")
