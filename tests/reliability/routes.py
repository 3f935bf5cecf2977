"""Route-table helpers: turn a service's ``app[keys.ROUTES]`` into concrete requests."""

from __future__ import annotations

import re

from mailgenius import keys
from mailgenius.web import PUBLIC_API_PREFIXES, Route

_PARAM = re.compile(r"{(\w+)(?::[^}]*)?}")


def concrete_path(path: str, value: str = "1") -> str:
    """``/api/imports/{id:\\d+}/errors`` -> ``/api/imports/1/errors``."""
    return _PARAM.sub(value, path)


def routes(app) -> list[Route]:
    return [r for r in app[keys.ROUTES] if r.method != "*"]


def needs_key(route: Route) -> bool:
    """Routes that must refuse a caller without an API key: every route that declares a scope,
    except the public health and OpenAPI documents (docs/design.md "HTTP")."""
    return route.scope is not None and not route.path.startswith(PUBLIC_API_PREFIXES)


def is_write(route: Route) -> bool:
    return route.method not in ("GET", "HEAD", "OPTIONS")


def required_scope(route: Route) -> str:
    """The scope the kernel enforces (a write route declared "read" is admin-only)."""
    if route.scope == "read" and is_write(route):
        return "admin"
    return route.scope


def under_scoped(scope: str) -> list[str]:
    """A key holding every scope but the one needed (and never admin, which implies all)."""
    return [s for s in ("read", "send", "import") if s != scope] or ["read"]


def api_reads(app) -> list[Route]:
    """GET routes under /api/ that need a key: what a client polls."""
    return [r for r in routes(app) if r.method == "GET" and r.path.startswith("/api/") and needs_key(r)]
