"""Browser sessions of the monitoring page, kept in Redis with an expiry.

An operator logs in with an API key (the login form; never a key in the URL); the page
then works with an opaque session cookie (HttpOnly, SameSite=Strict) and no key material in
URLs or in the page. Redis keeps only the SHA-256 of the session token and the *hash* of the
API key (never the key), so a session ends as soon as its key is revoked.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

from aiohttp import web

from mailgenius import auth
from mailgenius import keys as kernel_keys
from mailgenius.cache import rkey

#: the session cookie
COOKIE = "mg_monitoring_session"
#: seconds a session lives after login (a working day); log in again afterwards
SESSION_TTL = 12 * 3600


def _session_key(settings, token: str) -> str:
    return rkey(settings, "page-session", hashlib.sha256(token.encode()).hexdigest())


async def create_session(app: web.Application, key_hash: str, scopes: frozenset[str]) -> str:
    """A new session for a verified key; returns the token to put in the cookie."""
    token = secrets.token_urlsafe(32)
    body = json.dumps({"key_hash": key_hash, "scopes": sorted(scopes), "created": time.time()})
    await app[kernel_keys.REDIS].set(_session_key(app[kernel_keys.SETTINGS], token), body, ex=SESSION_TTL)
    return token


async def delete_session(app: web.Application, token: str) -> None:
    await app[kernel_keys.REDIS].delete(_session_key(app[kernel_keys.SETTINGS], token))


async def key_scopes(app: web.Application, key_hash: str) -> frozenset[str] | None:
    """Scopes of the active key with this hash, or None (unknown or revoked); cached briefly."""
    return await auth.lookup_hash(app[kernel_keys.DB], key_hash, app[kernel_keys.AUTH_CACHE])


async def session_scopes(request: web.Request) -> frozenset[str] | None:
    """The scopes of the request's session, or None (no cookie, expired, or key revoked).

    Also the kernel's ``SESSION_AUTH`` hook: it lets the page's script read the operator API
    (GET only) with the session cookie."""
    token = request.cookies.get(COOKIE, "")
    if not token or len(token) > 100:
        return None
    app = request.app
    raw = await app[kernel_keys.REDIS].get(_session_key(app[kernel_keys.SETTINGS], token))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        key_hash = data["key_hash"]
    except (ValueError, KeyError, TypeError):
        return None
    return await key_scopes(app, key_hash)


def set_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    """HttpOnly, SameSite=Strict; ``Secure`` when the page is served over https, directly or
    behind an HTTPS proxy (``MAILGENIUS_PUBLIC_URL`` https)."""
    public = request.app[kernel_keys.SETTINGS].public_url.lower()
    response.set_cookie(COOKIE, token, max_age=SESSION_TTL, path="/", httponly=True,
                        samesite="Strict", secure=request.secure or public.startswith("https://"))


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", samesite="Strict", httponly=True)
