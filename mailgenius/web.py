"""aiohttp kernel shared by every service: middleware (request id, metrics, JSON errors,
API-key auth), the route table type, the OpenAPI document, `/metrics`, health routes, and
:func:`base_app` which wires them together."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html import escape
from typing import Any

import asyncpg
import redis.exceptions
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import auth, errors, keys, logs
from .cache import redis_ctx
from .db import pool_ctx
from .health import UNHEALTHY, HealthRegistry, database_check, redis_check
from .metrics import HttpMetrics
from .procmetrics import service_registry
from .settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: paths that never need an API key (besides non-/api paths such as /metrics, webhooks, tracking)
PUBLIC_API_PREFIXES = ("/api/health", "/api/openapi.json")
#: the largest request id we accept from a client; longer ones are replaced
MAX_REQUEST_ID = 128
#: the largest JSON body any API takes, even in a service whose client_max_size is raised for
#: streamed uploads (the importer): a JSON body is read into memory whole
MAX_JSON_BYTES = 1 << 20


# -- route table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """One row of a service's route table; also the source of its OpenAPI operation."""

    method: str
    path: str
    handler: Handler
    #: scope a caller needs: None = public (no key), "read" = any valid key, else that scope
    scope: str | None = "read"
    summary: str = ""
    request_schema: dict | None = None
    #: content type of the request body when not JSON (e.g. multipart/form-data)
    request_content: str = "application/json"
    responses: dict[int, dict] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def add_routes(app: web.Application, routes: list[Route]) -> None:
    """Register the rows; the auth middleware finds a row again by its handler (so the HEAD
    twin aiohttp adds to every GET route is guarded like the GET)."""
    meta = app[keys.ROUTE_META]
    for r in routes:
        known = meta.get(r.handler)
        if known is not None and known.scope != r.scope:
            raise ValueError(f"handler {r.handler.__name__} is used with two scopes")
        app.router.add_route(r.method, r.path, r.handler)
        meta[r.handler] = r
    app[keys.ROUTES].extend(routes)


def json_response(data: Any, status: int = 200, **kw) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps, **kw)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_default, separators=(",", ":"))


def _default(o: Any) -> Any:
    import datetime as dt
    import decimal

    if isinstance(o, dt.datetime | dt.date):
        return o.isoformat()
    if isinstance(o, decimal.Decimal):
        return float(o)
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def error_body(code: str, message: str, details: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


def error_response(status: int, code: str, message: str, details: Any = None, headers=None) -> web.Response:
    return json_response(error_body(code, message, details), status=status, headers=headers)


async def read_body(request: web.Request, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole body, at most ``limit`` bytes whatever the transfer encoding: a Content-Length
    above it is refused before reading, and a chunked (or length-less) body is counted as it
    streams in and refused (413) as soon as it passes the limit, never buffered past it."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"a JSON body may be at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"a JSON body may be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request) -> Any:
    """The JSON body, or a 400 JSON error naming the problem (413 above :data:`MAX_JSON_BYTES`,
    for every transfer encoding)."""
    if not request.can_read_body:
        raise errors.AppError("a JSON body is required", code="invalid_json")
    body = await read_body(request, MAX_JSON_BYTES)
    try:
        return _loads(body.decode(request.charset or "utf-8"))
    except (ValueError, LookupError) as exc:
        raise errors.AppError(f"the body is not valid JSON: {exc}", code="invalid_json") from None


def _loads(text: str) -> Any:
    return json.loads(text)


def client_address(request: web.Request) -> str:
    """The client's IP address: the socket peer, unless the peer is a trusted reverse proxy
    (``MAILGENIUS_TRUSTED_PROXIES``), then the right-most ``X-Forwarded-For`` hop that is not
    itself a trusted proxy. A client cannot choose its address by sending the header: it is read
    only from trusted peers, and from the right (the hops our proxies appended)."""
    peer = request.remote or ""
    trusted = request.app[keys.SETTINGS].trusted_proxies
    if not trusted or not _in_networks(peer, trusted):
        return peer or "unknown"
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
    for hop in reversed([h for h in hops if h]):
        try:
            ip = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # not an address: our proxy would not write that; trust nothing past it
        if not any(ip in net for net in trusted):
            return str(ip)
    return peer


def _in_networks(addr: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def route_label(request: web.Request) -> str:
    """The route *template* (``/api/imports/{id}``), so ids never become label values."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:
        return "unmatched"
    return resource.canonical


# -- middleware --------------------------------------------------------------------------------

#: a prefix unique to this process and a counter make request ids unique without asking the OS
#: for 16 random bytes per request (uuid4 did: a getrandom() syscall on every request)
_RID_PREFIX = os.urandom(8).hex()
_rid_seq = itertools.count(1)
#: HTTP methods kept as they are in the ``method`` label; anything else a client invents is
#: ``other`` (the label set stays bounded whatever arrives)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: requests slower than this are logged (warning, "slow request") with route, status and time:
#: the operations guide greps the application log for "slow"; the HighAPILatency threshold
SLOW_REQUEST_SECONDS = 0.5


def new_request_id() -> str:
    """32 hex characters, unique per process (random prefix) and per request (counter)."""
    return f"{_RID_PREFIX}{next(_rid_seq) & 0xFFFFFFFFFFFFFFFF:016x}"


def request_metrics_middleware(service: str, metrics: HttpMetrics):
    """The outermost middleware: the request id (the client's ``X-Request-ID`` when sane, else
    a new one) bound to every log line and echoed in the response, the HTTP metrics by route
    template, and a warning log line for slow requests.

    One middleware rather than two, and the labelled children of the counter and histogram
    looked up once per (method, route, status) instead of on every request: this runs on
    every request of every service."""
    children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler):
        start = time.perf_counter()
        rid = request.headers.get("X-Request-ID")
        if not rid or len(rid) > MAX_REQUEST_ID or not rid.isprintable():
            rid = new_request_id()
        token = logs.bind(request_id=rid)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            response.headers["X-Request-ID"] = rid
            return response
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-ID"] = rid
            raise
        finally:
            elapsed = time.perf_counter() - start
            method = request.method
            if method not in KNOWN_METHODS:
                method = "other"
            key = (method, route_label(request), status)
            pair = children.get(key)
            if pair is None:
                pair = children[key] = (
                    metrics.requests.labels(service, method, key[1], str(status)),
                    metrics.duration.labels(service, method, key[1]),
                )
            pair[0].inc()
            pair[1].observe(elapsed)
            if elapsed > SLOW_REQUEST_SECONDS:
                log.warning("slow request", extra={"method": method, "route": key[1], "status": status,
                                                   "duration_ms": round(elapsed * 1000, 1)})
            logs.reset(token)

    return middleware


#: exceptions that mean "a dependency is down": 503, not 500
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    TimeoutError,
    OSError,
)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler):
    """Every error leaves as ``{"error": {"code", "message"}}`` with a fitting status."""
    try:
        return await handler(request)
    except errors.AppError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        code = exc.reason.lower().replace(" ", "_")
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return error_response(exc.status, code, message, headers=headers)
    except asyncio.CancelledError:
        raise
    except UNAVAILABLE_ERRORS as exc:
        log.warning("dependency unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        return error_response(503, "unavailable", "a dependency is unavailable; try again shortly",
                              headers={"Retry-After": "5"})
    except asyncpg.exceptions.DataError as exc:
        # SQLSTATE class 22 ("data exception"): Postgres refused a value the client sent (a NUL
        # character, a timestamp out of range, a number too large...): the client's fault, 422
        log.info("value refused by Postgres", extra={"error": f"{type(exc).__name__}: {exc}"})
        return error_response(422, "invalid_value", f"a value was refused: {exc}"[:300])
    except Exception:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler):
    """Bearer API keys on /api/* (but health and the OpenAPI document)."""
    path = request.path
    if not path.startswith("/api/") or path.startswith(PUBLIC_API_PREFIXES):
        return await handler(request)
    route_meta = request.app[keys.ROUTE_META].get(getattr(request.match_info, "handler", None))
    if route_meta is not None and route_meta.scope is None:
        return await handler(request)
    if route_meta is None:  # unmatched: let the router answer 404/405 without leaking auth state
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header and request.method in ("GET", "HEAD") and route_meta.scope == "read":
        # a browser session (SameSite=Strict cookie of the monitoring page) may read, never write
        session_auth = request.app.get(keys.SESSION_AUTH)
        scopes = await session_auth(request) if session_auth is not None else None
        if scopes is not None:
            request[keys.API_SCOPES] = scopes
            return await handler(request)
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scopes = await auth.lookup(request.app[keys.DB], key.strip(), request.app[keys.AUTH_CACHE])
    if scopes is None:
        raise errors.Unauthorized("invalid or revoked API key")
    needed = route_meta.scope
    if needed == "read" and request.method not in ("GET", "HEAD", "OPTIONS"):
        needed = "admin"  # a write route that forgot to declare its scope is admin-only
    if not auth.allows(scopes, needed):
        raise errors.Forbidden(f"this API key lacks the '{needed}' scope")
    request[keys.API_SCOPES] = scopes
    return await handler(request)


# -- what aiohttp answers before any middleware -------------------------------------------------

class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, but what its HTTP parser refuses (a request line or
    header over the size limits, too many headers, a malformed request) is answered with the
    JSON error shape like everything else, instead of aiohttp's text/plain page. No middleware
    sees those requests: the parser rejects them before routing, so this is the one place."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # a failure outside the middleware (which answers everything else)
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            code, text = ("timeout", "the request timed out") if status == 504 else (
                "internal_error", "internal server error")
        else:  # the caller's fault: not an operator's error log line (and no traceback)
            code, text = "bad_request", _parser_reason(exc, message)
            log.info("request refused by the HTTP parser", extra={"status": status, "error": text})
        if request.writer.output_size > 0:  # as aiohttp's: a response is already on its way
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        resp = web.Response(status=status, text=_dumps(error_body(code, text)), content_type="application/json")
        resp.force_close()
        return resp


def _parser_reason(exc: BaseException | None, message: str | None) -> str:
    from aiohttp.http_exceptions import LineTooLong

    if isinstance(exc, LineTooLong):  # its message quotes the offending bytes: say it in our words
        return f"the request line or a header is longer than {exc.args[1]} bytes"
    reason = getattr(exc, "message", None) or message or "malformed HTTP request"
    return f"malformed HTTP request: {reason}"[:300]


class _JsonErrorServer(web.Server):
    """``web.Server`` whose connections use :class:`JsonErrorRequestHandler`."""

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def _answer_parser_errors_in_json(app: web.Application) -> None:
    """Make every server of ``app`` (``web.run_app``, the test client's ``TestServer``, any
    ``AppRunner``) use :class:`_JsonErrorServer`. aiohttp builds the server in
    ``Application._make_handler`` and offers no option for the protocol class (aio-libs/aiohttp
    #3287; newer releases route parser errors through the middleware instead), so the app's
    own factory is wrapped; tests/reliability/test_auth_and_limits.py catches a release that
    changes this."""
    make_handler = app._make_handler

    def _make_handler(**kwargs):
        server = make_handler(**kwargs)
        server.__class__ = _JsonErrorServer  # same object and state, only __call__ differs
        return server

    # object.__setattr__: Application.__setattr__ warns about new attributes in debug mode
    object.__setattr__(app, "_make_handler", _make_handler)


# -- handlers shared by every service ----------------------------------------------------------

async def metrics_handler(request: web.Request) -> web.Response:
    registry = request.app[keys.REGISTRY]
    render = request.app.get(keys.METRICS_RENDER) or generate_latest
    try:
        body = await asyncio.get_running_loop().run_in_executor(None, render, registry)
    except Exception:
        log.exception("metrics collection failed")
        return web.Response(status=500, text="metrics collection failed\n")
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def index_handler(request: web.Request) -> web.Response:
    service = request.app[keys.SERVICE]
    html = (
        f"<!doctype html><title>MailGenius {service}</title><h1>MailGenius {service}</h1>"
        "<ul><li><a href='/metrics'>/metrics</a></li><li><a href='/api/health'>/api/health</a></li>"
        "<li><a href='/api/openapi.json'>/api/openapi.json</a></li>"
    )
    for href, label in request.app.get(keys.INDEX_LINKS, ()):
        html += f"<li><a href='{escape(href, quote=True)}'>{escape(label)}</a></li>"
    html += "</ul>"
    return web.Response(text=html, content_type="text/html")


async def may_see_details(request: web.Request) -> bool:
    """Whether the caller holds a valid API key (any scope) or a monitoring page session: only
    then does health show its details (relay host:port, volumes, backend URLs, error texts)."""
    try:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and key.strip() and keys.DB in request.app:
            return await auth.lookup(request.app[keys.DB], key.strip(), request.app[keys.AUTH_CACHE]) is not None
        session_auth = request.app.get(keys.SESSION_AUTH)
        return session_auth is not None and await session_auth(request) is not None
    except asyncio.CancelledError:
        raise
    except Exception:  # the store is down: health still answers, without details
        return False


def public_checks(checks: dict[str, dict]) -> dict[str, dict]:
    """The checks without their details (status and latency stay)."""
    return {name: {**c, "detail": ""} for name, c in checks.items()}


async def health_handler(request: web.Request) -> web.Response:
    """Public (load balancers, Prometheus): status and latency per check; the details only with
    an API key or a monitoring page session."""
    registry: HealthRegistry = request.app[keys.HEALTH]
    status, checks = await registry.run()
    if not await may_see_details(request):
        checks = public_checks(checks)
    body = {"status": status, "service": request.app[keys.SERVICE], "checks": checks}
    return json_response(body, status=503 if status == UNHEALTHY else 200)


async def health_one_handler(request: web.Request) -> web.Response:
    registry: HealthRegistry = request.app[keys.HEALTH]
    name = request.match_info["check"]
    if name not in registry.checks:
        raise errors.NotFound(f"no health check named {name!r}; known: {', '.join(registry.checks)}")
    status, checks = await registry.run([name])
    if not await may_see_details(request):
        checks = public_checks(checks)
    body = {"status": status, "service": request.app[keys.SERVICE], "checks": checks, **checks[name]}
    return json_response(body, status=503 if status == UNHEALTHY else 200)


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[keys.SERVICE], request.app[keys.ROUTES]))


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def openapi_document(service: str, routes: list[Route]) -> dict:
    paths: dict[str, dict] = {}
    for r in routes:
        if r.method == "*":
            continue
        op: dict[str, Any] = {
            "summary": r.summary or r.handler.__doc__ or r.path,
            "operationId": f"{r.method.lower()}_{r.handler.__name__}",
            "responses": {},
        }
        if r.tags:
            op["tags"] = list(r.tags)
        params = []
        import re

        for name in re.findall(r"{(\w+)(?::[^}]*)?}", r.path):
            params.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
        if params:
            op["parameters"] = params
        if r.scope is not None and r.path.startswith("/api/") and not r.path.startswith(PUBLIC_API_PREFIXES):
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": "missing or invalid key",
                                      "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            op["responses"]["403"] = {"description": "key lacks the scope",
                                      "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        if r.request_schema is not None:
            op["requestBody"] = {"required": True, "content": {r.request_content: {"schema": r.request_schema}}}
        for status, spec in (r.responses or {200: {"description": "OK"}}).items():
            op["responses"][str(status)] = spec
        op["responses"].setdefault("default", {"description": "error",
                                               "content": {"application/json": {"schema": ERROR_SCHEMA}}})
        clean_path = re.sub(r"{(\w+):[^}]*}", r"{\1}", r.path)
        paths.setdefault(clean_path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": f"MailGenius {service} API", "version": "1.0.0"},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


HEALTH_RESPONSE = {
    "description": "health",
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["status", "checks"],
        "properties": {"status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
                       "checks": {"type": "object"}},
    }}},
}


def base_routes() -> list[Route]:
    return [
        Route("GET", "/", index_handler, scope=None, summary="Links to /metrics and health"),
        Route("GET", "/metrics", metrics_handler, scope=None, summary="Prometheus metrics",
              responses={200: {"description": "exposition format", "content": {"text/plain": {}}}}),
        Route("GET", "/api/health", health_handler, scope=None, summary="Aggregated health",
              responses={200: HEALTH_RESPONSE, 503: HEALTH_RESPONSE}),
        Route("GET", "/api/health/{check}", health_one_handler, scope=None, summary="One health check",
              responses={200: HEALTH_RESPONSE, 503: HEALTH_RESPONSE, 404: {"description": "unknown check"}}),
        Route("GET", "/api/openapi.json", openapi_handler, scope=None, summary="This document"),
    ]


def base_app(
    settings: Settings,
    service: str,
    *,
    registry: CollectorRegistry | None = None,
    with_db: bool = True,
    with_redis: bool = True,
    client_max_size: int = 1 << 20,
) -> web.Application:
    """An application with the kernel wired in; the service adds its routes and checks."""
    registry = registry if registry is not None else service_registry()
    http_metrics = HttpMetrics(registry)
    app = web.Application(
        middlewares=[
            request_metrics_middleware(service, http_metrics),
            error_middleware,
            auth_middleware,
        ],
        client_max_size=client_max_size,
        handler_args={"max_field_size": 8190, "max_line_size": 8190},
    )
    _answer_parser_errors_in_json(app)
    app[keys.SETTINGS] = settings
    app[keys.SERVICE] = service
    app[keys.REGISTRY] = registry
    app[keys.HTTP_METRICS] = http_metrics
    app[keys.ROUTES] = []
    app[keys.ROUTE_META] = {}
    app[keys.AUTH_CACHE] = {}
    health = HealthRegistry(service=service, timeout=settings.health_timeout, gauge=http_metrics.health_up)
    app[keys.HEALTH] = health
    if with_db:
        app.cleanup_ctx.append(pool_ctx(settings, keys.DB))
        health.add("database", database_check(lambda: app[keys.DB]))
    if with_redis:
        app.cleanup_ctx.append(redis_ctx(settings, keys.REDIS))
        health.add("redis", redis_check(lambda: app[keys.REDIS]))
    add_routes(app, base_routes())
    app.on_startup.append(_freeze_startup_objects)  # after every cleanup_ctx has set up
    return app


async def _freeze_startup_objects(app: web.Application) -> None:
    """Collect once, then move everything alive after start-up (modules, the app, its routes,
    metrics, pools) out of the garbage collector's view (``gc.freeze``). Without it, every full
    collection walks those ~100,000 objects: measured 50 ms with the sender's app, a pause
    every 10-20 s at 2,000 req/s (the objects of the requests in flight at each young
    collection get promoted and trigger the next full one), i.e. the worst latencies of the
    load benchmark. Frozen objects are never freed: they live as long as the process anyway."""
    gc.collect()
    gc.freeze()
