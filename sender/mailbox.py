"""The bounce mailbox poller: reads DSNs and ARF complaint reports from a POP3 or IMAP mailbox
(the mailbox our return path and feedback-loop address deliver to) and records them
(sender/bounces.py), every ``MAILGENIUS_BOUNCE_MAILBOX_INTERVAL`` seconds.

Exactly once: a message is deleted (POP3 ``DELE``; IMAP ``\\Deleted`` flag) only after every
finding in it was committed to Postgres; the deletions take effect at ``QUIT`` (IMAP: EXPUNGE). If the connection or Postgres fails midway the
undeleted messages are read again at the next poll, and their findings, already stored under the
same key (``email_events``: source + the report's Message-ID + recipient), change nothing.
Messages that are not reports (out-of-office replies, spam) are left in the mailbox for a
person to read, and skipped by this process afterwards (remembered by their ``UIDL``).

POP3 and IMAP are served by stdlib :mod:`poplib` / :mod:`imaplib` (blocking) in a thread; the parsing and Postgres work run
on the event loop. One poll at a time fleet-wide: a Redis lock per interval (the same pattern as
the stalled-campaign sweeper), and POP3 servers lock the maildrop per session anyway.

Runs in each sender worker process (a thread started by the worker's middleware,
sender/actors.py) when ``MAILGENIUS_BOUNCE_MAILBOX_HOST`` is set.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import poplib
import ssl
from dataclasses import dataclass, field

from mailgenius.cache import rkey

from . import dsn
from .bounces import record_mailbox_message
from .events import WebhookError
from .periodic import PeriodicThread
from .tracking import load_secret

log = logging.getLogger(__name__)

#: poplib refuses lines longer than 2048 bytes (a session error that would stop every later poll
#: at the same message); reports quote whole messages, whose HTML lines can be longer
poplib._MAXLINE = max(poplib._MAXLINE, 1 << 20)
#: messages read per poll (the rest wait for the next one)
MAX_PER_POLL = 500
#: seconds of one POP3 / IMAP conversation step
POP3_TIMEOUT = 30.0
#: (protocol, implicit TLS) -> port, when MAILGENIUS_BOUNCE_MAILBOX_PORT is 0
DEFAULT_PORTS = {("pop3", True): 995, ("pop3", False): 110, ("imap", True): 993, ("imap", False): 143}


@dataclass
class PollResult:
    messages: int = 0
    findings: int = 0
    applied: int = 0
    duplicates: int = 0
    skipped: int = 0
    deleted: int = 0


@dataclass
class MailboxConfig:
    host: str
    port: int
    user: str
    password: str
    tls: str = "ssl"          # ssl | starttls | none
    interval: float = 60.0
    protocol: str = "pop3"    # pop3 | imap

    @classmethod
    def from_settings(cls, s) -> MailboxConfig | None:
        if not s.bounce_mailbox_host:
            return None
        port = s.bounce_mailbox_port or DEFAULT_PORTS[(s.bounce_mailbox_protocol, s.bounce_mailbox_tls == "ssl")]
        return cls(s.bounce_mailbox_host, port, s.bounce_mailbox_user, s.bounce_mailbox_password,
                   s.bounce_mailbox_tls, s.bounce_mailbox_interval, s.bounce_mailbox_protocol)


class Pop3Mailbox:
    """A blocking POP3 session; every method is called through :func:`asyncio.to_thread`."""

    def __init__(self, cfg: MailboxConfig):
        self.cfg = cfg
        self.conn: poplib.POP3 | None = None

    def open(self) -> None:
        c = self.cfg
        if c.tls == "ssl":
            conn = poplib.POP3_SSL(c.host, c.port, timeout=POP3_TIMEOUT, context=ssl.create_default_context())
        else:
            conn = poplib.POP3(c.host, c.port, timeout=POP3_TIMEOUT)
            if c.tls == "starttls":
                conn.stls(ssl.create_default_context())
        try:
            conn.user(c.user)
            conn.pass_(c.password)
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def listing(self) -> list[tuple[int, str]]:
        """(message number, unique id) of every message in the maildrop."""
        _resp, lines, _octets = self.conn.uidl()
        out = []
        for line in lines:
            num, uid = line.decode("ascii", "replace").split(" ", 1)
            out.append((int(num), uid.strip()))
        return out

    def retrieve(self, num: int) -> bytes:
        _resp, lines, _octets = self.conn.retr(num)
        return b"\r\n".join(lines) + b"\r\n"

    def delete(self, num: int) -> None:
        self.conn.dele(num)

    def quit(self) -> None:
        if self.conn is not None:
            try:
                self.conn.quit()  # commits the deletions
            finally:
                self.conn = None

    def abort(self) -> None:
        """Drop the session without QUIT: the server deletes nothing."""
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


class ImapMailbox:
    """A blocking IMAP session on INBOX, same interface as :class:`Pop3Mailbox`: messages are
    addressed by UID, "delete" flags ``\\Deleted`` (stored at once by the server) and ``quit``
    expunges. Only committed messages are ever flagged, so a message flagged but not expunged
    (the session broke) is already recorded; it is not listed again (``UID SEARCH UNDELETED``)
    and the next session's EXPUNGE removes it."""

    def __init__(self, cfg: MailboxConfig):
        self.cfg = cfg
        self.conn: imaplib.IMAP4 | None = None

    def open(self) -> None:
        c = self.cfg
        if c.tls == "ssl":
            conn = imaplib.IMAP4_SSL(c.host, c.port, ssl_context=ssl.create_default_context(), timeout=POP3_TIMEOUT)
        else:
            conn = imaplib.IMAP4(c.host, c.port, timeout=POP3_TIMEOUT)
            if c.tls == "starttls":
                conn.starttls(ssl.create_default_context())
        try:
            conn.login(c.user, c.password)
            typ, data = conn.select("INBOX")
            if typ != "OK":
                raise imaplib.IMAP4.error(f"SELECT INBOX: {data!r}")
        except BaseException:
            conn.shutdown()
            raise
        self.conn = conn

    def listing(self) -> list[tuple[int, str]]:
        typ, data = self.conn.uid("SEARCH", None, "UNDELETED")
        if typ != "OK":
            raise imaplib.IMAP4.error(f"UID SEARCH: {data!r}")
        return [(int(u), u.decode()) for u in (data[0] or b"").split()]

    def retrieve(self, num: int) -> bytes:
        typ, data = self.conn.uid("FETCH", str(num), "(BODY.PEEK[])")
        if typ != "OK":
            raise imaplib.IMAP4.error(f"UID FETCH {num}: {data!r}")
        for item in data:
            if isinstance(item, tuple) and len(item) == 2:
                return item[1]
        raise dsn.ReportError(f"UID {num} vanished from the mailbox")

    def delete(self, num: int) -> None:
        typ, data = self.conn.uid("STORE", str(num), "+FLAGS", "(\\Deleted)")
        if typ != "OK":
            raise imaplib.IMAP4.error(f"UID STORE {num}: {data!r}")

    def quit(self) -> None:
        if self.conn is not None:
            try:
                self.conn.expunge()
                self.conn.logout()
            finally:
                self.conn = None

    def abort(self) -> None:
        if self.conn is not None:
            try:
                self.conn.shutdown()
            finally:
                self.conn = None


@dataclass
class MailboxPoller:
    cfg: MailboxConfig
    pool: object
    metrics: object
    secret: bytes | None
    #: UIDLs of messages that are not reports, left in the mailbox and not read again
    skipped: set[str] = field(default_factory=set)

    async def poll_once(self) -> PollResult:
        res = PollResult()
        box = ImapMailbox(self.cfg) if self.cfg.protocol == "imap" else Pop3Mailbox(self.cfg)
        await asyncio.to_thread(box.open)
        try:
            listing = await asyncio.to_thread(box.listing)
            for num, uid in listing:
                if uid in self.skipped:
                    continue
                if res.messages >= MAX_PER_POLL:
                    break
                raw = await asyncio.to_thread(box.retrieve, num)
                res.messages += 1
                try:
                    applied = await record_mailbox_message(self.pool, self.metrics, raw, self.secret)
                except (dsn.ReportError, WebhookError) as exc:
                    # not a report, or one Postgres refuses to store: left for a person, not retried
                    log.info("bounce mailbox: not a report, left in the mailbox", extra={"uid": uid, "error": str(exc)})
                    self.skipped.add(uid)
                    res.skipped += 1
                    continue
                # committed: now (and only now) the message may go
                res.findings += len(applied)
                res.applied += sum(1 for a in applied if a.changed)
                res.duplicates += sum(1 for a in applied if a.duplicate)
                await asyncio.to_thread(box.delete, num)
                res.deleted += 1
        except BaseException:
            # Postgres or the mailbox failed midway: QUIT still deletes what was committed; if the
            # session itself broke, nothing is deleted and the next poll reads it again (deduped)
            try:
                await asyncio.to_thread(box.quit)
            except Exception:
                await asyncio.to_thread(box.abort)
            raise
        await asyncio.to_thread(box.quit)
        return res


async def poll_with_lock(poller: MailboxPoller, redis, settings) -> PollResult | None:
    """One poll unless another process holds this interval's lock."""
    got = await redis.set(rkey(settings, "sender", "bounce-mailbox"), "1", nx=True,
                          px=max(1000, int(poller.cfg.interval * 1000) - 500))
    if not got:
        return None
    return await poller.poll_once()


class MailboxThread(PeriodicThread):
    """Runs :func:`poll_with_lock` every ``interval`` seconds in its own event loop."""

    log = log
    failure = "bounce mailbox poll failed"  # the mailbox or a dependency down: next interval

    def __init__(self, settings, metrics, cfg: MailboxConfig):
        super().__init__("sender-bounce-mailbox", settings)
        self.metrics = metrics
        self.cfg = cfg
        self.poller: MailboxPoller | None = None

    @property
    def interval(self) -> float:
        return self.cfg.interval

    async def tick(self) -> None:
        if self.poller is None:
            secret = await load_secret(self.pool, self.settings.tracking_secret)
            self.poller = MailboxPoller(self.cfg, self.pool, self.metrics, secret)
        res = await poll_with_lock(self.poller, self.redis, self.settings)
        if res is not None and res.messages:
            log.info("bounce mailbox polled", extra=res.__dict__)
