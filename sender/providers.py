"""Email providers: Resend (HTTP batch endpoint) and SMTP (aiosmtplib, pooled connections).

A provider's ``send_batch(emails, idempotency_key)`` returns a :class:`SendResult`: which emails
were accepted (with the provider's id), which were refused for good (4xx, with the reason), and
which should be retried (with the error that made them so, honouring Retry-After), and, when the
call failed as a whole, ``call_error``: one of :data:`CALL_ERRORS`, the label of
``mailgenius_provider_errors_total`` (counted once per call by sender/delivery.py). It raises
nothing for provider trouble: the caller decides about retries and records every outcome.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiohttp
import aiosmtplib
import orjson

from . import config


@dataclass
class OutEmail:
    message_id: int
    to: str
    from_email: str
    subject: str
    html: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)


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
                 *, timeout: float = config.PROVIDER_TIMEOUT, observe=None):
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
#: SMTP replies that mean "slow down" (421 service busy / too many connections, 451 throttled or
#: greylisted): counted as rate_limited, retried like a 429 without Retry-After
SMTP_THROTTLE_CODES = (421, 451)


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


class SmtpProvider:
    """SMTP relay with a small pool of reused connections (optional STARTTLS / login).

    SMTP has no idempotency key. Every attempt at a recipient carries the same Message-ID
    (:func:`message_id_header`), and the ledger row is written right after the relay's reply, so
    a duplicate is possible only in one window: the relay answered 250 (it queued the message) and
    the worker died, or lost Postgres, before recording ``sent``; the redelivered batch sends the
    row again. A relay or mailbox that deduplicates on Message-ID (many do, e.g. Gmail within a
    short period) drops that repeat; others deliver it twice. The same holds for a 250 lost on the
    wire (connection reset after DATA): we retry, the relay may have queued the first copy.
    """

    name = "smtp"

    def __init__(self, host: str, port: int, *, starttls: bool = False, username: str = "",
                 password: str = "", pool_size: int = config.SMTP_POOL_SIZE,
                 timeout: float = config.PROVIDER_TIMEOUT, observe=None):
        self.host, self.port = host, port
        self.starttls, self.username, self.password = starttls, username, password
        self.timeout = timeout
        self.observe = observe
        self._idle: list[aiosmtplib.SMTP] = []
        self._sem = asyncio.Semaphore(pool_size)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                                 start_tls=self.starttls, use_tls=False)
        await client.connect()
        if self.username:
            await client.login(self.username, self.password)
        return client

    async def _send_one(self, e: OutEmail, result: SendResult) -> None:
        async with self._sem:
            client = self._idle.pop() if self._idle else None
            start = time.perf_counter()
            try:
                for attempt in (1, 2):  # a reused connection may have been closed by the server
                    try:
                        if client is None or not client.is_connected:
                            client = await self._connect()
                        await client.send_message(build_mime(e))
                        result.accepted[e.message_id] = message_id_header(e.message_id, e.from_email)
                        break
                    except aiosmtplib.SMTPServerDisconnected:
                        client = None
                        if attempt == 2:
                            raise
            except aiosmtplib.SMTPRecipientsRefused as exc:
                result.rejected[e.message_id] = ("rejected", str(exc)[:500])
            except aiosmtplib.SMTPResponseException as exc:
                if 500 <= exc.code < 600:
                    result.rejected[e.message_id] = ("rejected", f"{exc.code} {exc.message}"[:500])
                else:
                    result.retry.append(e.message_id)
                    reason = "rate_limited" if exc.code in SMTP_THROTTLE_CODES else "server_error"
                    result.error = ProviderError(reason, f"{exc.code} {exc.message}"[:500], True)
            except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
                client = None
                result.retry.append(e.message_id)
                result.error = ProviderError("timeout", str(exc)[:500] or "SMTP timeout", True)
            except (aiosmtplib.SMTPException, OSError) as exc:
                client = None
                result.retry.append(e.message_id)
                result.error = ProviderError("connection", f"{type(exc).__name__}: {exc}"[:500], True)
            finally:
                if self.observe:
                    self.observe("send", time.perf_counter() - start)
                if client is not None and client.is_connected:
                    self._idle.append(client)

    async def send_batch(self, emails: list[OutEmail], idempotency_key: str) -> SendResult:
        # SMTP has no idempotency key: exactly-once rests on the ledger and the stable Message-ID
        # (see the class docstring for the remaining window)
        result = SendResult()
        start = time.perf_counter()
        try:
            await asyncio.gather(*(self._send_one(e, result) for e in emails))
        finally:
            # one "send_batch" per call, as for Resend: the denominator of the provider error ratio
            if self.observe:
                self.observe("send_batch", time.perf_counter() - start)
        if result.retry and result.error is not None:
            result.call_error = result.error.reason  # timeout, connection, server_error or rate_limited
        return result

    async def check(self) -> str:
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=2, start_tls=False, use_tls=False)
        await client.connect()
        try:
            await client.noop()
        finally:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()
        return f"smtp {self.host}:{self.port} reachable"

    async def close(self) -> None:
        while self._idle:
            client = self._idle.pop()
            try:
                await client.quit()
            except Exception:
                client.close()


def _error_message(data, text: str, status: int) -> str:
    if isinstance(data, dict):
        msg = data.get("message") or data.get("error") or data.get("name")
        if msg:
            return f"HTTP {status}: {msg}"[:500]
    return f"HTTP {status}: {text[:200]}"
