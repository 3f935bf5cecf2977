"""Email providers: Resend (HTTP batch endpoint) and SMTP (aiosmtplib, pooled connections).

A provider's ``send_batch(emails, idempotency_key)`` returns a :class:`SendResult`: which emails
were accepted (with the provider's id), which were refused for good (4xx, with the reason), and
which should be retried (with the error that made them so, honouring Retry-After). It raises
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


@dataclass
class SendResult:
    accepted: dict[int, str] = field(default_factory=dict)   # message id -> provider id
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (reason, message)
    retry: list[int] = field(default_factory=list)
    error: ProviderError | None = None


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

    async def send_batch(self, emails: list[OutEmail], idempotency_key: str) -> SendResult:
        ids = [e.message_id for e in emails]
        headers = {"Authorization": f"Bearer {self.api_key}", "Idempotency-Key": idempotency_key,
                   "x-batch-validation": "permissive"}
        start = time.perf_counter()
        try:
            async with self.session.post(self.url, json=[self.payload(e) for e in emails],
                                         headers=headers, timeout=self.timeout) as resp:
                status = resp.status
                text = await resp.text()
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                data = None
                if resp.content_type == "application/json":
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:
                        data = None
        except TimeoutError:
            return SendResult(retry=ids, error=ProviderError("timeout", "provider call timed out", True))
        except aiohttp.ClientError as exc:
            return SendResult(retry=ids, error=ProviderError("connection", f"{type(exc).__name__}: {exc}", True))
        finally:
            if self.observe:
                self.observe("send_batch", time.perf_counter() - start)
        message = _error_message(data, text, status)
        if status == 429:
            return SendResult(retry=ids, error=ProviderError("rate_limited", message, True, retry_after))
        if status >= 500:
            return SendResult(retry=ids, error=ProviderError("server_error", message, True, retry_after))
        if status in (401, 403):
            return SendResult(rejected={i: ("auth", message) for i in ids})
        if status == 409:  # idempotent request still in flight elsewhere: try again shortly
            return SendResult(retry=ids, error=ProviderError("server_error", message, True, 1.0))
        if status >= 400:
            return SendResult(rejected={i: ("invalid_request", message) for i in ids})
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return SendResult(retry=ids, error=ProviderError("server_error", f"unexpected response: {text[:200]}", True))
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


def build_mime(e: OutEmail, *, domain: str = "mailgenius.local") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = e.from_email
    msg["To"] = e.to
    msg["Subject"] = e.subject
    msg["Message-ID"] = f"<mg-{e.message_id}@{domain}>"
    msg["Date"] = email.utils.formatdate(localtime=False)
    for k, v in e.headers.items():
        msg[k] = v
    msg.set_content(e.text or " ")
    if e.html:
        msg.add_alternative(e.html, subtype="html")
    return msg


class SmtpProvider:
    """SMTP relay with a small pool of reused connections (optional STARTTLS / login)."""

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
                        result.accepted[e.message_id] = f"<mg-{e.message_id}@mailgenius.local>"
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
                    result.error = ProviderError("server_error", f"{exc.code} {exc.message}"[:500], True)
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
        # SMTP has no idempotency key: exactly-once rests on the ledger alone (see actors.py)
        result = SendResult()
        await asyncio.gather(*(self._send_one(e, result) for e in emails))
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
