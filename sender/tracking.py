"""Signed tracking and unsubscribe tokens.

A token is ``<message id>.<link id>.<mac>`` (ids in lowercase hex) where mac is a keyed
BLAKE2b-96 (a MAC by construction, RFC 7693 keyed mode) of ``kind:message:link``, base64url. Any change to an id or the mac is a 404.
The secret comes from ``MAILGENIUS_TRACKING_SECRET`` or, when empty, is generated once and kept
in the ``settings`` table (key ``tracking_secret``) so every process signs alike.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any

#: standard base64 -> base64url
_URLSAFE = bytes.maketrans(b"+/", b"-_")

#: settings-table key of the generated secret
SECRET_KEY = "tracking_secret"


class Tracker:
    def __init__(self, secret: bytes, public_url: str):
        # BLAKE2b keys are at most 64 bytes: longer secrets are hashed down first
        self.secret = secret if len(secret) <= 64 else hashlib.sha512(secret).digest()
        self.base = public_url.rstrip("/")
        # per kind, a keyed hasher that has already absorbed "kind:": signing copies it (the send
        # path signs three URLs per email; copying skips the key block and the prefix)
        self._keyed: dict[str, Any] = {}

    def _mac(self, kind: str, msg: int, link: int) -> str:
        h = self._keyed.get(kind)
        if h is None:
            h = self._keyed[kind] = hashlib.blake2b(f"{kind}:".encode(), key=self.secret, digest_size=12)
        h = h.copy()
        h.update(f"{msg}:{link}".encode())
        # 12 bytes -> 16 base64url characters, never padded
        return binascii.b2a_base64(h.digest(), newline=False).translate(_URLSAFE).decode()

    def token(self, kind: str, msg_id: int, link_id: int = 0) -> str:
        return f"{msg_id:x}.{link_id:x}.{self._mac(kind, msg_id, link_id)}"

    def verify(self, kind: str, token: str) -> tuple[int, int] | None:
        parts = token.split(".")
        if len(parts) != 3 or len(token) > 80:
            return None
        try:
            msg, link = int(parts[0], 16), int(parts[1], 16)
        except ValueError:
            return None
        if parts[0] != f"{msg:x}" or parts[1] != f"{link:x}":
            return None
        if not hmac.compare_digest(parts[2], self._mac(kind, msg, link)):
            return None
        return msg, link

    def open_url(self, msg_id: int) -> str:
        return f"{self.base}/t/o/{self.token('o', msg_id)}"

    def click_url(self, msg_id: int, link_id: int) -> str:
        return f"{self.base}/t/c/{self.token('c', msg_id, link_id)}"

    def unsubscribe_url(self, msg_id: int) -> str:
        return f"{self.base}/u/{self.token('u', msg_id)}"


async def load_secret(pool, configured: str) -> bytes:
    """The configured secret, else the one stored in the settings table (created on first use)."""
    if configured:
        return configured.encode()
    candidate = secrets.token_urlsafe(32)
    await pool.execute(
        "INSERT INTO settings (key, value) VALUES ($1, $2::jsonb) ON CONFLICT (key) DO NOTHING",
        SECRET_KEY, json.dumps(candidate),
    )
    stored = await pool.fetchval("SELECT value FROM settings WHERE key = $1", SECRET_KEY)
    return json.loads(stored).encode()
