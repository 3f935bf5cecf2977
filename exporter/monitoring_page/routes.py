"""Routes of the monitoring page: the page itself, login/logout, and the JSON the page's
script polls besides the operator API (charts, alerts, logs, imports, log export)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import jinja2
from aiohttp import web

from mailgenius import auth, errors
from mailgenius import keys as kernel_keys
from mailgenius.cache import rkey
from mailgenius.web import Route, add_routes, client_address, json_response

from . import budgets, keys, sessions, sources
from .csvsafe import to_csv, to_ndjson
from .imports import import_overview
from .logview import (
    KNOWN_SERVICES,
    LEVELS,
    SCAN_LIMIT,
    LogFilter,
    parse_after,
    parse_limit,
    read_logs,
)

HERE = Path(__file__).resolve().parent
#: where the page lives (the operations guide's address)
BASE = "/dashboard/monitoring"
#: milliseconds between two polls of the page (the guide: every 5 s)
REFRESH_MS = 5000
#: the page's own JSON, under the page's path (operator API calls go to /api/*)
API = f"{BASE}/api"
#: columns of a log export, in order
EXPORT_COLUMNS = ("ts", "level", "service", "logger", "message", "request_id", "id")
#: the longest API key accepted by the login form (real ones are ~55 characters)
MAX_KEY_CHARS = 200
#: failed logins allowed per client address per window before it must wait (guessing guard);
#: raise it if many operators share one NAT address
LOGIN_FAILURES_ALLOWED = 10
#: seconds of that window
LOGIN_FAILURE_WINDOW = 60

#: Content-Security-Policy of every page response: our own files only, no inline script/style
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _secure(resp: web.StreamResponse) -> web.StreamResponse:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: under no-referrer a browser sends `Origin: null` with the
    # page's own form posts, which the sign-in refuses (login CSRF); other sites still get nothing
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _render(request: web.Request, name: str, status: int = 200, **ctx) -> web.Response:
    env: jinja2.Environment = request.app[keys.JINJA]
    router = request.app.router

    def static(filename: str) -> str:
        return str(router["monitoring_page_static"].url_for(filename=filename))

    html = env.get_template(name).render(base=BASE, api=API, static=static, **ctx)
    return _secure(web.Response(text=html, content_type="text/html", status=status))


async def _require_session(request: web.Request) -> frozenset[str]:
    scopes = await sessions.session_scopes(request)
    if scopes is None:
        raise errors.Unauthorized("not logged in to the monitoring page (or the session expired)")
    return scopes


def _origin_of(url: str) -> str:
    p = urlsplit(url)
    default = {"http": 80, "https": 443}.get(p.scheme)
    host = (p.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{p.scheme}://{host}" + (f":{p.port}" if p.port and p.port != default else "")


def allowed_origins(request: web.Request) -> set[str]:
    """Origins a form post may come from: this server as the request reached it, the public URL
    (``MAILGENIUS_PUBLIC_URL``), and behind an HTTPS proxy (public URL https) this host over
    https: the proxy terminates TLS, so the request itself arrives as http."""
    public = request.app[kernel_keys.SETTINGS].public_url
    origins = {_origin_of(f"{request.scheme}://{request.host}"), _origin_of(public)}
    if public.lower().startswith("https://"):
        origins.add(_origin_of(f"https://{request.host}"))
    return origins


def _check_origin(request: web.Request) -> None:
    """Form posts must come from this page (SameSite=Strict is the first line of defence).
    ``Origin: null`` (a sandboxed frame, a data: page, some redirects) is refused: a login from
    there is a login CSRF (the victim ends up signed in with the attacker's key)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser (browsers send Origin on every form POST)
    if origin == "null" or _origin_of(origin) not in allowed_origins(request):
        raise errors.Forbidden("cross-origin form post refused")


async def _login_with_key(request: web.Request, key: str) -> web.StreamResponse:
    redis = request.app[kernel_keys.REDIS]
    # per client address: behind a trusted proxy (MAILGENIUS_TRUSTED_PROXIES) the X-Forwarded-For
    # client, else the socket peer (one attacker must not lock out every operator behind the proxy)
    failures_key = rkey(request.app[kernel_keys.SETTINGS], "page-login-failures", client_address(request))
    failures = int(await redis.get(failures_key) or 0)
    if failures >= LOGIN_FAILURES_ALLOWED:
        resp = _render(request, "login.html.j2", status=429,
                       error=f"Too many failed sign-ins from this address; wait {LOGIN_FAILURE_WINDOW} s.")
        resp.headers["Retry-After"] = str(LOGIN_FAILURE_WINDOW)
        return resp
    key = key.strip()
    scopes = None
    if key and len(key) <= MAX_KEY_CHARS and key.isprintable():
        scopes = await auth.lookup(request.app[kernel_keys.DB], key, request.app[kernel_keys.AUTH_CACHE])
    if scopes is None:
        pipe = redis.pipeline(transaction=False)
        pipe.incr(failures_key)
        pipe.expire(failures_key, LOGIN_FAILURE_WINDOW, nx=True)
        await pipe.execute()
        return _render(request, "login.html.j2", status=401,
                       error="That API key is not valid (unknown or revoked).")
    token = await sessions.create_session(request.app, auth.hash_key(key), scopes)
    # 303 to the bare page address: the key never stays in the address bar or in history
    resp = web.Response(status=303, headers={"Location": BASE})
    sessions.set_cookie(request, resp, token)
    return _secure(resp)


# -- pages -----------------------------------------------------------------------------------

async def page(request: web.Request) -> web.StreamResponse:
    """The monitoring page, or the login form. A key in the address (``?key=``) never signs in:
    it would stay in proxy logs, browser history and Referer headers."""
    if "key" in request.query:
        return _render(request, "login.html.j2", status=400,
                       error="API keys in the address are not accepted (they end up in logs and history); "
                             "sign in with the form, and revoke that key if it was a real one.")
    if await sessions.session_scopes(request) is None:
        return _render(request, "login.html.j2", error=None)
    return _render(request, "monitoring.html.j2", refresh_ms=REFRESH_MS, ranges=list(sources.RANGES),
                   levels=LEVELS, services=KNOWN_SERVICES,
                   service=request.app[kernel_keys.SERVICE])


async def login(request: web.Request) -> web.StreamResponse:
    """Log in with an API key (form field ``key``)."""
    _check_origin(request)
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        raise errors.AppError("send the login form (application/x-www-form-urlencoded) with a 'key' field",
                              code="unsupported_media_type", status=415)
    try:
        form = await request.post()
    except ValueError as exc:  # e.g. multipart without a boundary
        raise errors.AppError(f"the form body is malformed: {exc}", code="invalid_form") from None
    key = form.get("key", "")
    if not isinstance(key, str):
        raise errors.ValidationError("key: expected a text field")
    return await _login_with_key(request, key)


async def logout(request: web.Request) -> web.StreamResponse:
    """End the session and forget the cookie."""
    _check_origin(request)
    token = request.cookies.get(sessions.COOKIE)
    if token:
        await sessions.delete_session(request.app, token)
    resp = web.Response(status=303, headers={"Location": BASE})
    sessions.clear_cookie(resp)
    return _secure(resp)


# -- JSON for the page -------------------------------------------------------------------------

async def api_series(request: web.Request) -> web.Response:
    """Chart data over ``range`` (1h, 6h, 24h) from Prometheus range queries (fixed allow-list)."""
    await _require_session(request)
    name, rng = sources.parse_range(request.query.get("range"))
    cache = request.app[keys.SERIES_CACHE]
    hit = cache.get(name)
    if hit is not None and hit[0] > time.monotonic():
        return _secure(json_response(hit[1]))
    settings = request.app[kernel_keys.SETTINGS]
    body = await sources.range_series(request.app[keys.HTTP], settings.prometheus_url, name, rng)
    cache[name] = (time.monotonic() + rng.cache_seconds, body)
    return _secure(json_response(body))


#: seconds one answer of the budgets is reused for every viewer (the page polls every 5 s)
BUDGETS_CACHE_SECONDS = 4.0


async def api_slos(request: web.Request) -> web.Response:
    """Error budgets of the SLOs (budget left over 30 days, burn rate, time to exhaustion)."""
    await _require_session(request)
    cache = request.app[keys.SERIES_CACHE]
    hit = cache.get("slos")
    if hit is not None and hit[0] > time.monotonic():
        return _secure(json_response(hit[1]))
    settings = request.app[kernel_keys.SETTINGS]
    body = await budgets.slo_budgets(request.app[keys.HTTP], settings.prometheus_url)
    cache["slos"] = (time.monotonic() + BUDGETS_CACHE_SECONDS, body)
    return _secure(json_response(body))


async def api_alerts(request: web.Request) -> web.Response:
    """Active alerts from Alertmanager."""
    await _require_session(request)
    settings = request.app[kernel_keys.SETTINGS]
    return _secure(json_response(await sources.active_alerts(request.app[keys.HTTP], settings.alertmanager_url)))


async def api_imports(request: web.Request) -> web.Response:
    """Imports in progress and the last finished ones (rows/s, ETA, errors)."""
    await _require_session(request)
    return _secure(json_response(await import_overview(request.app[kernel_keys.DB])))


async def api_logs(request: web.Request) -> web.Response:
    """Recent WARNING+ log records, filtered by ``service``, ``level`` (minimum) and ``q`` (text);
    ``after`` (a stream id) returns only newer ones."""
    await _require_session(request)
    flt = LogFilter.from_query(request.query)
    after = parse_after(request.query.get("after"))
    limit = parse_limit(request.query.get("limit"))
    settings = request.app[kernel_keys.SETTINGS]
    entries, last_id = await read_logs(request.app[kernel_keys.REDIS], settings.redis_prefix, flt,
                                       after=after, limit=limit)
    return _secure(json_response({"entries": entries, "last_id": last_id, "levels": LEVELS,
                                  "services": KNOWN_SERVICES}))


async def api_logs_export(request: web.Request) -> web.Response:
    """The matching log records as a CSV (formula-safe cells) or NDJSON download."""
    await _require_session(request)
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "ndjson"):
        raise errors.ValidationError(f"format: must be csv or ndjson; got {fmt[:20]!r}")
    flt = LogFilter.from_query(request.query)
    settings = request.app[kernel_keys.SETTINGS]
    entries, _ = await read_logs(request.app[kernel_keys.REDIS], settings.redis_prefix, flt, limit=SCAN_LIMIT)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if fmt == "csv":
        body, ctype = to_csv(entries, EXPORT_COLUMNS), "text/csv"
    else:
        body, ctype = to_ndjson(entries, EXPORT_COLUMNS), "application/x-ndjson"
    resp = web.Response(text=body, content_type=ctype, charset="utf-8", headers={
        "Content-Disposition": f'attachment; filename="mailgenius-logs-{stamp}.{fmt}"',
    })
    return _secure(resp)


def _html(description: str) -> dict:
    return {"description": description, "content": {"text/html": {}}}


def _json(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}


_UNAUTH = {401: _json("not logged in to the monitoring page (JSON error)")}
_LOGIN = {303: {"description": "signed in: session cookie set, sent to the page"},
          401: _html("invalid key: the login form with a message"),
          429: _html("too many failed sign-ins from this address: wait Retry-After seconds")}


def routes() -> list[Route]:
    tags = ("monitoring-page",)
    return [
        Route("GET", BASE, page, scope=None, summary="Monitoring page (login form without a session)",
              responses={200: _html("the page, or the login form"), **_LOGIN}, tags=tags),
        Route("POST", f"{BASE}/login", login, scope=None, summary="Log in to the page with an API key",
              request_content="application/x-www-form-urlencoded",
              request_schema={"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}},
              responses=_LOGIN, tags=tags),
        Route("POST", f"{BASE}/logout", logout, scope=None, summary="Log out of the page",
              responses={303: {"description": "signed out; sent to the login form"}}, tags=tags),
        Route("GET", f"{API}/series", api_series, scope=None, summary=api_series.__doc__.split("\n")[0],
              responses={200: _json("charts and figures, or ok=false when Prometheus is unreachable"),
                         **_UNAUTH}, tags=tags),
        Route("GET", f"{API}/slos", api_slos, scope=None, summary=api_slos.__doc__.split("\n")[0],
              responses={200: _json("error budgets per SLO, or ok=false when Prometheus is unreachable"),
                         **_UNAUTH}, tags=tags),
        Route("GET", f"{API}/alerts", api_alerts, scope=None, summary="Active alerts from Alertmanager",
              responses={200: _json("alerts, or ok=false when Alertmanager is unreachable"), **_UNAUTH},
              tags=tags),
        Route("GET", f"{API}/imports", api_imports, scope=None, summary="Imports in progress",
              responses={200: _json("imports"), **_UNAUTH}, tags=tags),
        Route("GET", f"{API}/logs", api_logs, scope=None, summary="Recent WARNING+ log records",
              responses={200: _json("log records"), **_UNAUTH}, tags=tags),
        Route("GET", f"{API}/logs/export", api_logs_export, scope=None, summary="Export log records (CSV or NDJSON)",
              responses={200: {"description": "a file", "content": {"text/csv": {}, "application/x-ndjson": {}}},
                         **_UNAUTH}, tags=tags),
    ]


def _http_ctx():
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=sources.BACKEND_TIMEOUT)) as http:
            app[keys.HTTP] = http
            yield

    return ctx


def setup_monitoring_page(app: web.Application) -> None:
    """Mount the page on an application built by :func:`mailgenius.web.base_app` (with its
    Postgres pool and Redis client): routes, static files, sessions, and a link from ``/``."""
    app[keys.JINJA] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app[keys.SERIES_CACHE] = {}
    app.cleanup_ctx.append(_http_ctx())
    add_routes(app, routes())
    app.router.add_static(f"{BASE}/static/", HERE / "static", name="monitoring_page_static",
                          append_version=True)
    app[kernel_keys.SESSION_AUTH] = sessions.session_scopes
    app.setdefault(kernel_keys.INDEX_LINKS, []).append((BASE, "Monitoring page"))
