"""Email providers: Resend (HTTP batch endpoint) and SMTP (aiosmtplib, pooled connections).

A provider's ``send_batch(emails, idempotency_key)`` returns a :class:`SendResult`: which emails
were accepted (with the provider's id), which were refused for good (4xx, with the reason), and
which should be retried (with the error that made them so, honouring Retry-After), and, when the
call failed as a whole, ``call_error``: one of :data:`CALL_ERRORS`, the label of
``mailgenius_provider_errors_total`` (counted once per call by sender/delivery.py). It raises
nothing for provider trouble: the caller decides about retries and records every outcome.
A provider without idempotency keys (SMTP, ``write_ahead = True``) also takes
``on_accepted(message_id, provider_id)``, called the moment each message is accepted, so the
caller can write that down before the batch ends (sender/journal.py).
"""

from __future__ import annotations

import asyncio
import binascii
import email.header
import email.policy
import email.utils
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiohttp
import aiosmtplib
import orjson

from mailgenius.settings import SenderSettings

from .smtp_pool import SmtpPool


@dataclass
class OutEmail:
    message_id: int
    to: str
    from_email: str
    subject: str
    html: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)
    #: the SMTP envelope sender (MAIL FROM), where DSNs go: our signed VERP address when
    #: ``MAILGENIUS_BOUNCE_DOMAIN`` is set (sender/dsn.py); "" = the From address
    return_path: str = ""


@dataclass
class ProviderError:
    """Why a call (or part of it) failed. ``reason`` is a bounded metric label."""

    reason: str
    message: str
    retryable: bool
    retry_after: float | None = None


#: why a provider call failed as a whole (bounded: the ``reason`` of provider_errors_total)
CALL_ERRORS = ("server_error", "timeout", "connection", "rate_limited", "client_error")


@dataclass
class SendResult:
    accepted: dict[int, str] = field(default_factory=dict)   # message id -> provider id
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (reason, message)
    retry: list[int] = field(default_factory=list)
    error: ProviderError | None = None
    #: set when the call failed as a whole (one of CALL_ERRORS); None when it was answered, even
    #: if some recipients were refused
    call_error: str | None = None
    #: rejected ids that are hard bounces (the recipient's mailbox does not exist): the lead is
    #: suppressed when they are recorded
    bounced: set[int] = field(default_factory=set)
    #: rejected or deferred id -> (stage, SMTP reply code), for the failures report
    details: dict[int, tuple[str, int | None]] = field(default_factory=dict)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ResendProvider:
    """POST {base}/emails/batch, <= 100 emails, permissive validation (per-email errors)."""

    name = "resend"

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str,
                 *, timeout: float = SenderSettings.provider_timeout, observe=None):
        self.session = session
        self.url = base_url.rstrip("/") + "/emails/batch"
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.observe = observe  # callable(operation, seconds) for the latency histogram

    @staticmethod
    def payload(e: OutEmail) -> dict:
        body = {"from": e.from_email, "to": [e.to], "subject": e.subject,
                "tags": [{"name": "mg_message_id", "value": str(e.message_id)}]}
        if e.html:
            body["html"] = e.html
        if e.text:
            body["text"] = e.text
        if e.headers:
            body["headers"] = e.headers
        return body

    @classmethod
    def encode(cls, emails: list[OutEmail]) -> bytes:
        """The batch request body (orjson: ~10x cheaper than json.dumps for 100 rendered emails)."""
        return orjson.dumps([cls.payload(e) for e in emails])

    async def send_batch(self, emails: list[OutEmail], idempotency_key: str) -> SendResult:
        ids = [e.message_id for e in emails]
        headers = {"Authorization": f"Bearer {self.api_key}", "Idempotency-Key": idempotency_key,
                   "x-batch-validation": "permissive", "Content-Type": "application/json"}
        start = time.perf_counter()
        try:
            async with self.session.post(self.url, data=self.encode(emails),
                                         headers=headers, timeout=self.timeout) as resp:
                status = resp.status
                raw = await resp.read()
                text = raw.decode("utf-8", "replace")
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                data = None
                if resp.content_type == "application/json":
                    try:
                        data = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        data = None
        except TimeoutError:
            return SendResult(retry=ids, error=ProviderError("timeout", "provider call timed out", True),
                              call_error="timeout")
        except aiohttp.ClientError as exc:
            return SendResult(retry=ids, error=ProviderError("connection", f"{type(exc).__name__}: {exc}", True),
                              call_error="connection")
        finally:
            if self.observe:
                self.observe("send_batch", time.perf_counter() - start)
        message = _error_message(data, text, status)
        if status == 429:
            return SendResult(retry=ids, error=ProviderError("rate_limited", message, True, retry_after),
                              call_error="rate_limited")
        if status >= 500:
            return SendResult(retry=ids, error=ProviderError("server_error", message, True, retry_after),
                              call_error="server_error")
        if status in (401, 403):
            return SendResult(rejected={i: ("auth", message) for i in ids}, call_error="client_error")
        if status == 409:  # idempotent request still in flight elsewhere: try again shortly
            return SendResult(retry=ids, error=ProviderError("server_error", message, True, 1.0),
                              call_error="client_error")
        if status >= 400:
            return SendResult(rejected={i: ("invalid_request", message) for i in ids}, call_error="client_error")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return SendResult(retry=ids, error=ProviderError("server_error", f"unexpected response: {text[:200]}", True),
                              call_error="server_error")
        failed: dict[int, str] = {}
        for err in data.get("errors") or []:
            try:
                failed[int(err["index"])] = str(err.get("message", "rejected"))[:500]
            except (KeyError, TypeError, ValueError):
                continue
        result = SendResult()
        ok_ids = iter(data["data"])
        for index, msg_id in enumerate(ids):
            if index in failed:
                result.rejected[msg_id] = ("rejected", failed[index])
                continue
            item = next(ok_ids, None)
            if item is None:
                result.rejected[msg_id] = ("invalid_request", "provider returned no id")
            else:
                result.accepted[msg_id] = str(item.get("id", ""))
        return result

    async def check(self) -> str:
        async with self.session.get(self.base_url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            await resp.read()
            return f"resend reachable (HTTP {resp.status})"


#: right-hand side of the Message-ID when the From address has no usable domain
DEFAULT_MESSAGE_ID_DOMAIN = "mailgenius.local"

#: the stages of an SMTP conversation a recipient can be refused or deferred at (``connect``
#: covers the greeting, EHLO, STARTTLS and AUTH; ``MAIL`` the envelope sender)
SMTP_STAGES = ("connect", "MAIL", "RCPT", "DATA")
#: ``421``: the relay is closing the connection (busy, too many connections, shutting down)
SMTP_CLOSING = 421
#: an RFC 3463 enhanced status code at the start of a reply's text
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
#: wording of mailbox errors in replies that carry no enhanced status code
_MAILBOX_WORDS = re.compile(r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox (unavailable|"
                            r"not found|disabled|does not exist)|does not exist|recipient (address )?rejected: "
                            r"user unknown|invalid (recipient|mailbox)|address rejected", re.I)


def enhanced_status(text: str) -> tuple[int, int, int] | None:
    m = _ENHANCED.match(text or "")
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def is_hard_bounce(code: int, text: str, stage: str) -> bool:
    """A permanent refusal that says the *recipient's mailbox* is bad (the lead is suppressed).

    RFC 3463 ``5.1.x`` (bad destination mailbox or address: 5.1.1 user unknown, 5.1.2 no such
    domain, 5.1.10 null MX...) and ``5.2.1`` (mailbox disabled), at RCPT or DATA; 5.1.7/5.1.8 are
    about the *sender's* address and are not. A reply without an enhanced code counts only when it
    is 550/551/553 at RCPT and its wording names the mailbox: "550 relaying denied" or a policy
    refusal must never suppress a whole list.
    """
    if not 500 <= code < 600 or stage not in ("RCPT", "DATA"):
        return False
    enh = enhanced_status(text)
    if enh is not None:
        cls, subject, detail = enh
        return cls == 5 and ((subject == 1 and detail not in (7, 8)) or (subject, detail) == (2, 1))
    return stage == "RCPT" and code in (550, 551, 553) and bool(_MAILBOX_WORDS.search(text or ""))


def smtp_recipient(address: str) -> tuple[str, bool]:
    """The address for the envelope and whether it needs SMTPUTF8 (RFC 6531).

    A non-ASCII domain is sent as IDNA (A-labels), which any relay takes; only a non-ASCII local
    part needs the relay's SMTPUTF8 extension.
    """
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address, not address.isascii()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return address, True  # not IDNA-encodable: only an SMTPUTF8 relay may take it
    return f"{local}@{domain}", not local.isascii()


def envelope_sender(from_email: str) -> str:
    """The bare address of a From header (``"News" <news@x>`` -> ``news@x``)."""
    addr = email.utils.parseaddr(from_email)[1]
    return addr or from_email


def message_id_header(message_id: int, from_email: str = "") -> str:
    """The RFC 5322 Message-ID of a ledger row: ``<mg-<id>@<From domain>>``.

    Derived only from the row id and the campaign's From address, so every attempt at the same
    recipient (in-process retries, dramatiq redeliveries, a worker restarted after a crash) carries
    the same id and a relay or mailbox that deduplicates on Message-ID can drop a repeat.
    """
    _, at, domain = from_email.rpartition("@")
    domain = domain.strip().rstrip(">").lower()
    if not at or "." not in domain or not all(c.isalnum() or c in ".-" for c in domain):
        domain = DEFAULT_MESSAGE_ID_DOMAIN
    return f"<mg-{message_id}@{domain}>"


def build_mime(e: OutEmail) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = e.from_email
    msg["To"] = e.to
    msg["Subject"] = e.subject
    msg["Message-ID"] = message_id_header(e.message_id, e.from_email)
    msg["Date"] = email.utils.formatdate(localtime=False)
    for k, v in e.headers.items():
        msg[k] = v
    msg.set_content(e.text or " ")
    if e.html:
        msg.add_alternative(e.html, subtype="html")
    return msg


def mime_bytes_slow(e: OutEmail, *, utf8: bool) -> bytes:
    """:func:`mime_bytes` through the standard library's email package (the reference the fast
    builder is tested against; ~1-2 ms a message, most of a worker's CPU at SMTP speed)."""
    return build_mime(e).as_bytes(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)


_date_cache: list = [0, ""]


def _date_header() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, email.utils.formatdate(now, localtime=False)
    return _date_cache[1]


def _header_value(value: str, utf8: bool) -> str:
    """One header's value: no CR/LF (header injection), RFC 2047 encoded (and folded) when it is
    not ASCII and the relay takes no raw UTF-8, folded when very long."""
    if "\r" in value or "\n" in value:
        value = " ".join(value.splitlines())
    if (value.isascii() or utf8) and len(value) <= 900:
        return value
    return email.header.Header(value, "utf-8", maxlinelen=76).encode(linesep="\r\n")


def _address_header(value: str, utf8: bool) -> str:
    """From / To: the display name encoded when needed, a non-ASCII domain as IDNA."""
    if "\r" in value or "\n" in value:
        value = " ".join(value.splitlines())
    if value.isascii() or utf8:
        return value
    name, addr = email.utils.parseaddr(value)
    addr = smtp_recipient(addr)[0] if addr else addr
    return email.utils.formataddr((name, addr), charset="utf-8") if name else addr


def _qp(text: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    return binascii.b2a_qp(body, quotetabs=False, istext=True, header=False).replace(b"\n", b"\r\n")


def mime_bytes(e: OutEmail, *, utf8: bool) -> bytes:
    """The message as sent after DATA: multipart/alternative (text, html) in quoted-printable
    UTF-8, CRLF line ends, headers RFC 2047-encoded unless the relay takes SMTPUTF8.

    Built directly (about 30x cheaper than the email package, :func:`mime_bytes_slow`, whose
    output it matches field for field; tests/sender/test_smtp_mime.py parses both)."""
    head = [f"From: {_address_header(e.from_email, utf8)}",
            f"To: {_address_header(e.to, utf8)}",
            f"Subject: {_header_value(e.subject, utf8)}",
            f"Message-ID: {message_id_header(e.message_id, e.from_email)}",
            f"Date: {_date_header()}"]
    for k, v in e.headers.items():
        head.append(f"{k}: {_header_value(v, utf8)}")
    head.append("MIME-Version: 1.0")
    text = e.text or " "
    if not e.html:
        head += ['Content-Type: text/plain; charset="utf-8"', "Content-Transfer-Encoding: quoted-printable"]
        return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + _qp(text) + b"\r\n"
    boundary = f"==mg-{e.message_id}-{secrets.token_hex(8)}=="
    head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    b = boundary.encode()
    part = b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
    return b"".join((("\r\n".join(head) + "\r\n\r\n").encode("utf-8"),
                     b"--", b, b"\r\n", part % b"plain", _qp(text), b"\r\n",
                     b"--", b, b"\r\n", part % b"html", _qp(e.html), b"\r\n",
                     b"--", b, b"--\r\n"))


@dataclass
class _Answer:
    """How one recipient's conversation ended."""

    kind: str            # "accepted", "refused" (permanent), "deferred" (retry), "lost" (dropped)
    stage: str = ""
    code: int | None = None
    text: str = ""
    reason: str = ""     # refused: failures label; deferred: ProviderError reason
    keep: bool = True    # the connection may be reused
    call_error: str | None = None  # the relay itself failed (counts toward provider errors)


#: how bad a deferral is, to pick the one error a batch reports (highest wins)
_SEVERITY = {"deferred": 1, "server_error": 2, "timeout": 3, "connection": 4, "rate_limited": 5}


class SmtpProvider:
    """SMTP relay through a bounded pool of reused connections (STARTTLS, login optional).

    Every recipient gets its own conversation (MAIL, RCPT, DATA) on a pooled connection, and its
    answer is classified by stage:

    * ``2xx`` after DATA: accepted;
    * ``5xx`` at RCPT or DATA: refused for good. A mailbox error (5.1.x, 5.2.1, see
      :func:`is_hard_bounce`) is a hard bounce (``result.bounced``: the row is marked failed with
      delivery ``bounced`` and the lead suppressed, in the recording transaction); anything else
      fails with the relay's reply. The connection is reset (RSET) and reused;
    * ``4xx`` at RCPT (greylisting, mailbox full): retried with back-off, not a relay failure;
    * ``421`` anywhere, a ``4xx``/``5xx`` at MAIL or in the greeting, a timeout, a dropped
      connection: the relay's trouble, retried; counted once per call in ``call_error``. A 421 or
      a drop closes that connection (the pool opens another later);
    * a non-ASCII local part and a relay without SMTPUTF8: refused at once (reason ``smtputf8``),
      never retried, never a connection error; the other recipients of the batch are sent.

    A permanent refusal is never a ``call_error``: a list full of dead addresses is not a provider
    outage (EmailProviderFailing counts ``mailgenius_provider_errors_total``).

    SMTP has no idempotency key: every attempt at a recipient carries the same Message-ID
    (:func:`message_id_header`). Each relay 250 is handed to ``send_batch``'s ``on_accepted`` at
    once, and the sender appends it to its journal (one unbuffered write, sender/journal.py), so a
    worker killed with -9 mid-batch loses none of the answers it read: the next claim records them
    and sends only the rest. The sender also keeps the answers until they are recorded (it retries
    recording through a Postgres outage, journaled and fsync'd), so an outage does not resend.
    What remains: the messages in flight when a worker is killed (at most one per open
    connection: the relay accepted, the 250 was not read or written yet), the write-ahead lines a
    machine crash loses (not fsync'd), and a 250 lost on the wire (connection reset after the body
    was sent: we retry, the relay may have queued the first copy).
    """

    name = "smtp"
    #: send_batch takes ``on_accepted``: no idempotency key, so every 250 is written ahead
    write_ahead = True

    def __init__(self, host: str, port: int, *, starttls: bool = False, username: str = "",
                 password: str = "", pool_size: int = SenderSettings.smtp_pool_size,
                 timeout: float = SenderSettings.provider_timeout, observe=None,
                 opportunistic_tls: bool = SenderSettings.smtp_opportunistic_tls,
                 verify_tls: bool | None = None, on_connections=None):
        self.host, self.port = host, port
        self.relay = f"{host}:{port}"
        self.starttls, self.username, self.password = starttls, username, password
        #: True: STARTTLS required (certificate verified); None: when the relay offers it
        #: (opportunistic, like Postfix's "may": not verified unless SMTP_TLS_VERIFY); False: never
        self.start_tls: bool | None = True if starttls else (None if opportunistic_tls else False)
        self.verify_tls = (starttls or SenderSettings.smtp_tls_verify) if verify_tls is None else verify_tls
        self.timeout = timeout
        self.observe = observe
        self.pool = SmtpPool(self._connect, pool_size,
                             (lambda n: on_connections(self.relay, n)) if on_connections else None)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                                 start_tls=self.start_tls, validate_certs=self.verify_tls, use_tls=False)
        try:
            await client.connect()
            if client.last_ehlo_response is None:  # the extensions (SMTPUTF8) are needed up front
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
            if self.username:
                await client.login(self.username, self.password)
        except BaseException:
            client.close()  # never leave a half-open connection behind
            raise
        return client

    @staticmethod
    async def _reset(client: aiosmtplib.SMTP) -> bool:
        """RSET after a refusal so the connection can carry the next message."""
        try:
            await client.rset()
            return client.is_connected
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False

    async def _converse(self, client: aiosmtplib.SMTP, e: OutEmail) -> _Answer:
        rcpt, rcpt_utf8 = smtp_recipient(e.to)
        sender, sender_utf8 = smtp_recipient(e.return_path or envelope_sender(e.from_email))
        utf8 = rcpt_utf8 or sender_utf8
        if utf8 and not client.supports_extension("smtputf8"):
            who = e.to if rcpt_utf8 else e.from_email
            return _Answer("refused", "RCPT", None, f"the relay does not support SMTPUTF8 (RFC 6531), required "
                           f"for the non-ASCII address {who}", "smtputf8")
        enc = "utf-8" if utf8 else "ascii"
        stage = "MAIL"
        try:
            await client.mail(sender, options=["SMTPUTF8"] if utf8 else None, encoding=enc)
            stage = "RCPT"
            await client.rcpt(rcpt, encoding=enc)
            stage = "DATA"
            await client.data(mime_bytes(e, utf8=utf8))
            return _Answer("accepted")
        except aiosmtplib.SMTPResponseException as exc:
            return await self._refusal(client, stage, exc.code, exc.message)
        except aiosmtplib.SMTPServerDisconnected as exc:
            # "lost": retried; at MAIL on a reused connection, at once on a fresh one (the relay
            # closed it while idle). After DATA the relay may have queued it: only a later retry
            return _Answer("lost", stage, None, f"connection lost: {exc}"[:400], "connection", False, "connection")
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            return _Answer("deferred", stage, None, str(exc)[:400] or "SMTP timeout", "timeout", False, "timeout")
        except (aiosmtplib.SMTPException, OSError) as exc:
            return _Answer("deferred", stage, None, f"{type(exc).__name__}: {exc}"[:400], "connection", False,
                           "connection")

    async def _refusal(self, client: aiosmtplib.SMTP, stage: str, code: int, text: str) -> _Answer:
        text = " ".join((text or "").split())[:400]
        if code == SMTP_CLOSING:  # aiosmtplib closed the connection already; back off
            return _Answer("deferred", stage, code, text, "rate_limited", keep=False, call_error="rate_limited")
        keep = await self._reset(client)
        if 500 <= code < 600:
            if stage == "MAIL":  # the relay refuses our sender: not the recipient's fault
                return _Answer("refused", stage, code, text, "rejected", keep)
            return _Answer("refused", stage, code, text,
                           "bounced" if is_hard_bounce(code, text, stage) else "rejected", keep)
        if 400 <= code < 500 and stage == "RCPT":
            return _Answer("deferred", stage, code, text, "deferred", keep)  # greylisted, mailbox full
        return _Answer("deferred", stage, code, text, "server_error", keep, call_error="server_error")

    async def _send_one(self, e: OutEmail, result: SendResult, on_accepted) -> None:
        start = time.perf_counter()
        answer: _Answer | None = None
        try:
            for attempt in (1, 2):
                stage = "connect"
                try:
                    client, fresh = await self.pool.acquire()
                except aiosmtplib.SMTPResponseException as exc:  # the greeting / EHLO / AUTH refused
                    reason = "rate_limited" if exc.code == SMTP_CLOSING else "server_error"
                    answer = _Answer("deferred", stage, exc.code, " ".join(exc.message.split())[:400],
                                     reason, False, reason)
                    break
                except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
                    answer = _Answer("deferred", stage, None, str(exc)[:400] or "SMTP timeout", "timeout",
                                     False, "timeout")
                    break
                except (aiosmtplib.SMTPException, OSError) as exc:
                    answer = _Answer("deferred", stage, None, f"{type(exc).__name__}: {exc}"[:400], "connection",
                                     False, "connection")
                    break
                keep = False
                try:
                    answer = await self._converse(client, e)
                    keep = answer.keep
                except (UnicodeError, ValueError) as exc:  # an address the library cannot encode
                    answer = _Answer("refused", "RCPT", None, f"invalid address: {exc}"[:400], "rejected")
                finally:
                    self.pool.release(client, reuse=keep)  # closed unless reusable
                if answer.kind == "lost":
                    if answer.stage == "MAIL" and attempt == 1 and not fresh:
                        continue
                    answer.kind = "deferred"
                break
        finally:
            if self.observe:
                self.observe("send", time.perf_counter() - start)
        self._note(e, answer, result, on_accepted)

    def _note(self, e: OutEmail, a: _Answer, result: SendResult, on_accepted=None) -> None:
        mid = e.message_id
        if a.kind == "accepted":
            pid = result.accepted[mid] = message_id_header(mid, e.from_email)
            if on_accepted is not None:  # the write-ahead: before anything else can happen
                on_accepted(mid, pid)
            return
        result.details[mid] = (a.stage, a.code)
        text = f"{a.code} {a.text}" if a.code else a.text
        if a.kind == "refused":
            result.rejected[mid] = (a.reason, text[:500])
            if a.reason == "bounced":
                result.bounced.add(mid)
            return
        result.retry.append(mid)
        if result.error is None or _SEVERITY[a.reason] > _SEVERITY.get(result.error.reason, 0):
            result.error = ProviderError(a.reason, text[:500], True)
        if a.call_error and (result.call_error is None
                             or _SEVERITY[a.call_error] > _SEVERITY.get(result.call_error, 0)):
            result.call_error = a.call_error

    async def send_batch(self, emails: list[OutEmail], idempotency_key: str, *,
                         on_accepted: Callable[[int, str], None] | None = None) -> SendResult:
        """Send every email; ``on_accepted(message_id, provider_id)`` is called the moment the
        relay's final 250 for a message is read, before the batch ends (SMTP has no idempotency
        key: the sender appends it to its journal, see the class docstring)."""
        result = SendResult()
        start = time.perf_counter()
        try:
            await asyncio.gather(*(self._send_one(e, result, on_accepted) for e in emails))
        finally:
            # one "send_batch" per call, as for Resend: the denominator of the provider error ratio
            if self.observe:
                self.observe("send_batch", time.perf_counter() - start)
        return result

    async def check(self) -> str:
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=2, start_tls=False, use_tls=False)
        try:
            await client.connect()
            await client.noop()
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                pass
        finally:
            client.close()
        return f"smtp {self.host}:{self.port} reachable"

    async def close(self) -> None:
        await self.pool.close()


def _error_message(data, text: str, status: int) -> str:
    if isinstance(data, dict):
        msg = data.get("message") or data.get("error") or data.get("name")
        if msg:
            return f"HTTP {status}: {msg}"[:500]
    return f"HTTP {status}: {text[:200]}"
