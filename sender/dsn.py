"""Reading bounce and complaint reports: RFC 3464 delivery status notifications (DSN) and
RFC 5965 abuse feedback reports (ARF), as mail servers and mailbox providers' feedback loops
write them, and VERP return paths that carry our message id.

A DSN is ``multipart/report; report-type=delivery-status``: a human-readable part, a
``message/delivery-status`` part (one block of per-message fields, then one block per recipient
with ``Final-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code``...) and, usually, the
returned message or its headers (``message/rfc822`` or ``text/rfc822-headers``).

An ARF report is ``multipart/report; report-type=feedback-report``: a human-readable part, a
``message/feedback-report`` part (``Feedback-Type: abuse``, ``Original-Rcpt-To``...) and the
reported message or its headers.

Each report is matched to our message by, in order:

1. a VERP address ``bounces+<id>-<mac>@<domain>`` (the return path we sent with: the DSN comes
   back *to* it; a receiving MTA writes it into the reported message's ``Return-Path``), whose
   mac (HMAC-SHA256 of the id under the tracking secret, 16 hex digits, lowercase so an MTA that
   folds case keeps it valid) proves we made it;
2. the returned message's ``Message-ID``: the SMTP provider sends ``<mg-<id>@<domain>>``
   (sender/providers.py). Anybody can write such a header, so this match is applied only when
   the report names the same recipient as our message (:class:`sender.events.Report.recipient`).

Classification (RFC 3463 status codes): ``Action: failed`` with ``5.1.x`` (bad address) or
``5.2.1`` (mailbox disabled) is a hard bounce (the lead becomes ``bounced``); any other failure
(``5.2.2`` mailbox full, ``5.7.x`` policy, ``4.x.x``) is a soft bounce (the message is marked,
the lead stays); ``delayed`` is ``delivery_delayed``; ``delivered``/``relayed`` is
``delivered``. An ARF ``Feedback-Type: abuse`` is a complaint; other feedback types are stored
but change nothing.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import email.utils
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser

#: the local part before the ``+``
VERP_LOCAL = "bounces"
VERP_RE = re.compile(r"^bounces\+(\d{1,19})-([0-9a-f]{16})@", re.IGNORECASE)
MESSAGE_ID_RE = re.compile(r"<mg-(\d{1,19})@[^<>\s]+>")
STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
#: the largest report read (larger messages are returned whole by some servers; we need headers)
MAX_REPORT_BYTES = 4 * 1024 * 1024


class ReportError(ValueError):
    """The message is not a delivery status notification or feedback report we can read."""


def verp_mac(secret: bytes, message_id: int) -> str:
    return hmac.new(secret, f"verp:{message_id}".encode(), hashlib.sha256).hexdigest()[:16]


def verp_address(secret: bytes, message_id: int, domain: str) -> str:
    """The return path of one message: ``bounces+<id>-<mac>@<domain>``."""
    return f"{VERP_LOCAL}+{message_id}-{verp_mac(secret, message_id)}@{domain}"


def parse_verp(secret: bytes, address: str) -> int | None:
    """Our message id when ``address`` is a VERP address we signed, else None."""
    m = VERP_RE.match(address.strip().strip("<>"))
    if m is None:
        return None
    mid = int(m.group(1))
    if not 0 < mid < 2**63 or not hmac.compare_digest(verp_mac(secret, mid), m.group(2).lower()):
        return None
    return mid


@dataclass
class Finding:
    """One recipient's outcome in a report."""

    event: str | None           # bounced, complained, delivery_delayed, delivered, or None (stored only)
    hard: bool = True
    recipient: str | None = None
    status: str = ""
    action: str = ""
    diagnostic: str = ""


@dataclass
class ParsedReport:
    kind: str                   # dsn | arf
    key: str                    # the report's dedup key (its Message-ID, else a hash of its bytes)
    findings: list[Finding]
    message_id: int | None = None   # our message, when found
    matched_by: str = ""            # verp | message-id | ""
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    summary: dict = field(default_factory=dict)


def _addr(value: str | None) -> str | None:
    """``rfc822; user@example.com`` -> ``user@example.com``."""
    if not value:
        return None
    v = str(value).strip()
    if ";" in v:
        kind, v = v.split(";", 1)
        if kind.strip().lower() not in ("rfc822", "utf-8"):
            return None
    v = v.strip().strip("<>").strip()
    return v or None


def classify(action: str, status: str) -> tuple[str | None, bool]:
    """(event, hard) for one DSN recipient block."""
    action = action.strip().lower()
    m = STATUS_RE.search(status or "")
    cls, subj, detail = (m.group(1), m.group(2), m.group(3)) if m else ("", "", "")
    if action == "failed":
        if cls == "5" and (subj == "1" or (subj == "2" and detail == "1")):
            return "bounced", True
        return "bounced", False
    if action == "delayed":
        return "delivery_delayed", False
    if action in ("delivered", "relayed", "expanded"):
        return "delivered", False
    return None, False


def _original_headers(msg: Message) -> Message | None:
    """The returned / reported message's headers (message/rfc822 or text/rfc822-headers)."""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload:
                return payload[0]
            if isinstance(payload, Message):
                return payload
        if ctype in ("text/rfc822-headers", "message/global-headers"):
            raw = part.get_payload(decode=True) or b""
            return BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return None


def _report_part(msg: Message, ctype: str) -> list[Message]:
    for part in msg.walk():
        if part.get_content_type() == ctype:
            payload = part.get_payload()
            if isinstance(payload, list):
                return payload
            if isinstance(payload, str):  # a parser that kept it as text: the blocks are header groups
                return [HeaderParser().parsestr(block) for block in re.split(r"\r?\n\r?\n", payload) if block.strip()]
    return []


def _match(msg: Message, original: Message | None, secret: bytes | None) -> tuple[int | None, str]:
    candidates = []
    for h in ("To", "Delivered-To", "X-Original-To", "Envelope-To"):
        candidates += [a for _n, a in email.utils.getaddresses(msg.get_all(h, []))]
    if original is not None:
        candidates += [a for _n, a in email.utils.getaddresses(original.get_all("Return-Path", []))]
    if secret:
        for a in candidates:
            mid = parse_verp(secret, a)
            if mid is not None:
                return mid, "verp"
    if original is not None:
        m = MESSAGE_ID_RE.search(str(original.get("Message-ID", "")))
        if m and 0 < int(m.group(1)) < 2**63:
            return int(m.group(1)), "message-id"
    return None, ""


def _key(msg: Message, raw: bytes) -> str:
    mid = str(msg.get("Message-ID", "") or "").strip()
    if mid and len(mid) <= 180:
        return mid
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _date(msg: Message, *fields: str) -> dt.datetime:
    for f in fields:
        v = msg.get(f)
        if v:
            try:
                t = email.utils.parsedate_to_datetime(str(v))
            except (TypeError, ValueError, IndexError):
                continue
            if t is not None:
                return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return dt.datetime.now(dt.UTC)


def parse(raw: bytes, secret: bytes | None = None) -> ParsedReport:
    """Read one mailbox message; raises :class:`ReportError` when it is neither a DSN nor an ARF
    report (an out-of-office reply, spam...) or is too broken to read."""
    try:
        return _parse(raw, secret)
    except ReportError:
        raise
    except (ValueError, TypeError, LookupError, AttributeError, UnicodeError) as exc:
        raise ReportError(f"unreadable report: {type(exc).__name__}: {exc}"[:300]) from None


def _parse(raw: bytes, secret: bytes | None) -> ParsedReport:
    if len(raw) > MAX_REPORT_BYTES:
        raw = raw[:MAX_REPORT_BYTES]
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/report":
        raise ReportError(f"not a report (Content-Type {msg.get_content_type()})")
    rtype = (msg.get_param("report-type") or "").lower()
    original = _original_headers(msg)
    message_id, matched_by = _match(msg, original, secret)
    key = _key(msg, raw)
    if rtype == "delivery-status":
        blocks = _report_part(msg, "message/delivery-status")
        if len(blocks) < 2:
            raise ReportError("a delivery-status report without a per-recipient block")
        per_message, recipients = blocks[0], blocks[1:]
        findings = []
        for b in recipients:
            action, status = str(b.get("Action", "")), str(b.get("Status", ""))
            event, hard = classify(action, status)
            rcpt = _addr(b.get("Original-Recipient")) or _addr(b.get("Final-Recipient"))
            findings.append(Finding(event, hard, rcpt, status.strip()[:20], action.strip().lower()[:20],
                                    " ".join(str(b.get("Diagnostic-Code", "")).split())[:500]))
        if not any(f.action for f in findings):
            raise ReportError("a delivery-status report whose recipient blocks have no Action")
        summary = {"reporting_mta": str(per_message.get("Reporting-MTA", ""))[:200]}
        return ParsedReport("dsn", key, findings, message_id, matched_by, _date(msg, "Date"), summary)
    if rtype == "feedback-report":
        blocks = _report_part(msg, "message/feedback-report")
        if not blocks:
            raise ReportError("a feedback report without its message/feedback-report part")
        fr = blocks[0]
        ftype = str(fr.get("Feedback-Type", "")).strip().lower()
        if not ftype:
            raise ReportError("a feedback report without Feedback-Type")
        rcpt = _addr(fr.get("Original-Rcpt-To"))
        if rcpt is None and original is not None:
            tos = email.utils.getaddresses(original.get_all("To", []))
            rcpt = tos[0][1] if len(tos) == 1 and tos[0][1] else None
        event = "complained" if ftype == "abuse" else None
        summary = {"feedback_type": ftype[:40], "user_agent": str(fr.get("User-Agent", ""))[:200],
                   "source_ip": str(fr.get("Source-IP", ""))[:60]}
        at = _date(fr, "Arrival-Date", "Received-Date") if fr.get("Arrival-Date") else _date(msg, "Date")
        return ParsedReport("arf", key, [Finding(event, True, rcpt, action=ftype[:20])], message_id, matched_by,
                            at, summary)
    raise ReportError(f"unsupported report-type {rtype!r}")
