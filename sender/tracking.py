"""Signed tracking and unsubscribe tokens.

A token is ``<message id>.<link id>.<mac>`` (ids in base 36) where mac is the first 12 bytes of
HMAC-SHA256(secret, kind:message:link), base64url. Any change to an id or the mac is a 404.
The secret comes from ``MAILGENIUS_TRACKING_SECRET`` or, when empty, is generated once and kept
in the ``settings`` table (key ``tracking_secret``) so every process signs alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets

#: settings-table key of the generated secret
SECRET_KEY = "tracking_secret"


def _b36(n: int) -> str:
    if n == 0:
        return "0"
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append("0123456789abcdefghijklmnopqrstuvwxyz"[r])
    return "".join(reversed(out))


class Tracker:
    def __init__(self, secret: bytes, public_url: str):
        self.secret = secret
        self.base = public_url.rstrip("/")

    def _mac(self, kind: str, msg: int, link: int) -> str:
        d = hmac.digest(self.secret, f"{kind}:{msg}:{link}".encode(), hashlib.sha256)[:12]
        return base64.urlsafe_b64encode(d).decode()

    def token(self, kind: str, msg_id: int, link_id: int = 0) -> str:
        return f"{_b36(msg_id)}.{_b36(link_id)}.{self._mac(kind, msg_id, link_id)}"

    def verify(self, kind: str, token: str) -> tuple[int, int] | None:
        parts = token.split(".")
        if len(parts) != 3 or len(token) > 80:
            return None
        try:
            msg, link = int(parts[0], 36), int(parts[1], 36)
        except ValueError:
            return None
        if parts[0] != _b36(msg) or parts[1] != _b36(link):
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
