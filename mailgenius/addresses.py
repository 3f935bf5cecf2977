"""The one email address parser: every address an API accepts (a transactional ``to``, a
campaign's or an email's ``from_email``) and every suppression lookup goes through here.

An address is exactly one bare ``local@domain`` (RFC 5322 dot-atom local part, letters of any
script allowed as RFC 6531 does): no display name, no comment (``(x)a@b.com``), no list
(``a@b.com,c@d.com``), no quoted local part, no source route, no whitespace or control
characters. The domain is normalised with IDNA (UTS 46: lower case, ``münchen.de`` ->
``xn--mnchen-3ya.de``), so the same mailbox always has the same spelling.

A ``From`` may add a display name (``Name <news@example.org>``), but only a plain one: words and
spaces, or one quoted string; never an ``@``, ``<``, ``>``, comma or parenthesis outside quotes,
so ``x@evil.example <news@example.org>`` cannot show one address and send from another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna

#: RFC 5321 limits
MAX_LOCAL = 64
MAX_DOMAIN = 253
MAX_ADDRESS = 254
#: the longest display name we accept in a From
MAX_DISPLAY_NAME = 100

# atext of RFC 5322 plus letters/digits of any script (\w is Unicode-aware); no "(", ")", ",",
# "<", ">", "@", ";", ":", "\\", '"', "[", "]", whitespace or control characters
_ATOM = r"[\w!#$%&'*+/=?^`{|}~-]+"
_LOCAL_RE = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TLD_RE = re.compile(r"(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})")
#: a plain display name: words and spaces and a few punctuation marks (no specials)
_PLAIN_NAME_RE = re.compile(r"[\w!#$%&'*+/=?^`{|}~. -]{1,"
                            + str(MAX_DISPLAY_NAME) + "}")
#: a quoted display name: no quote, backslash or control character inside
_QUOTED_NAME_RE = re.compile(r'"([^"\\\x00-\x1f\x7f]{1,' + str(MAX_DISPLAY_NAME) + '})"')


class AddressError(ValueError):
    """Not exactly one acceptable address; the message says why (safe to show a client)."""


@dataclass(frozen=True)
class Address:
    #: the local part as given (case kept: a few servers care)
    local: str
    #: the domain, IDNA-encoded ASCII, lower case
    domain: str

    @property
    def addr(self) -> str:
        """``local@domain``: what goes into the envelope and the message."""
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """The lower-case form suppression and duplicate checks compare."""
        return self.addr.lower()

    def __str__(self) -> str:
        return self.addr


def _domain(raw: str) -> str:
    if not raw or len(raw) > MAX_DOMAIN or raw.endswith(".") or raw.startswith("."):
        raise AddressError("the domain is missing or malformed")
    if raw.startswith("["):
        raise AddressError("address literals ([1.2.3.4]) are not accepted")
    try:
        ascii_domain = idna.encode(raw, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(f"the domain is not a valid (internationalised) domain name: {exc}") from None
    ascii_domain = ascii_domain.lower()
    labels = ascii_domain.split(".")
    if len(labels) < 2 or len(ascii_domain) > MAX_DOMAIN:
        raise AddressError("the domain needs at least two labels (example.com)")
    if not all(_LABEL_RE.fullmatch(label) for label in labels) or not _TLD_RE.fullmatch(labels[-1]):
        raise AddressError("the domain is malformed")
    return ascii_domain


def parse_address(value: object) -> Address:
    """Exactly one bare ``local@domain``, or :class:`AddressError`."""
    if not isinstance(value, str):
        raise AddressError("an email address must be a string")
    raw = value.strip()
    if not raw:
        raise AddressError("the email address is empty")
    if len(raw) > MAX_ADDRESS * 4:  # before any work on it (IDNA may shrink a Unicode domain)
        raise AddressError("the email address is too long")
    if raw.count("@") != 1:
        raise AddressError("expected exactly one address: local@domain (no lists, no quoted parts)")
    local, _, domain = raw.partition("@")
    if not local or len(local) > MAX_LOCAL or not _LOCAL_RE.fullmatch(local):
        raise AddressError("the part before @ must be a plain name (no spaces, comments, commas, "
                           "quotes or display names)")
    address = Address(local, _domain(domain))
    if len(address.addr.encode()) > MAX_ADDRESS:
        raise AddressError(f"the email address is longer than {MAX_ADDRESS} bytes")
    return address


def is_valid(value: object) -> bool:
    try:
        parse_address(value)
    except AddressError:
        return False
    return True


def normalise(value: object) -> str:
    """``local@ascii-domain`` (case of the local part kept); AddressError when invalid."""
    return parse_address(value).addr


def suppression_keys(value: object) -> list[str]:
    """The lower-case spellings under which this mailbox may be stored: the IDNA form and, for an
    internationalised domain, the Unicode form too (the importer keeps domains as written)."""
    a = parse_address(value)
    keys = [a.key]
    if "xn--" in a.domain:
        try:
            unicode_domain = idna.decode(a.domain)
        except (idna.IDNAError, UnicodeError):
            unicode_domain = None
        if unicode_domain:
            keys.append(f"{a.local}@{unicode_domain}".lower())
    return keys


@dataclass(frozen=True)
class FromAddress:
    name: str
    address: Address

    def __str__(self) -> str:
        if not self.name:
            return self.address.addr
        return f"{self.name} <{self.address.addr}>"


def parse_from(value: object) -> FromAddress:
    """``addr`` or ``Display Name <addr>`` (display name plain words, or one quoted string)."""
    if not isinstance(value, str):
        raise AddressError("from_email must be a string")
    raw = value.strip()
    if not raw:
        raise AddressError("from_email is required")
    if "<" not in raw and ">" not in raw:
        return FromAddress("", parse_address(raw))
    if raw.count("<") != 1 or raw.count(">") != 1 or not raw.endswith(">"):
        raise AddressError("from_email must be 'news@example.com' or 'Name <news@example.com>'")
    name, _, rest = raw.partition("<")
    addr = parse_address(rest[:-1])
    name = name.strip()
    if not name:
        return FromAddress("", addr)
    quoted = _QUOTED_NAME_RE.fullmatch(name)
    if quoted:
        inner = quoted.group(1).strip()
        if "@" in inner:
            raise AddressError("the display name of from_email must not contain an address")
        return FromAddress(name, addr)
    if "@" in name or not _PLAIN_NAME_RE.fullmatch(name):
        raise AddressError("the display name of from_email may hold words and spaces only "
                           "(no address, comma, parenthesis or angle bracket; quote it otherwise)")
    return FromAddress(name, addr)
