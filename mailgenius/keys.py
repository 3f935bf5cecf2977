"""Typed aiohttp application keys shared by every service (service-specific ones live in the
service's own ``keys.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

if TYPE_CHECKING:

    pass

SETTINGS = web.AppKey("settings", "Settings")
SERVICE = web.AppKey("service", str)
DB = web.AppKey("db", asyncpg.Pool)
REDIS = web.AppKey("redis", "aioredis.Redis")
REGISTRY = web.AppKey("registry", CollectorRegistry)
HTTP_METRICS = web.AppKey("http_metrics", "HttpMetrics")
HEALTH = web.AppKey("health", "HealthRegistry")
ROUTES = web.AppKey("routes", list)
ROUTE_META = web.AppKey("route_meta", dict)
AUTH_CACHE = web.AppKey("auth_cache", dict)
#: request storage: the scopes of the caller's API key
API_SCOPES = web.RequestKey("api_scopes", frozenset)
#: optional async (request) -> frozenset[str] | None: a browser session (the monitoring page's
#: cookie) accepted by the auth middleware for GET/HEAD on "read" routes when no Authorization
#: header is sent
SESSION_AUTH = web.AppKey("session_auth", object)
#: extra (href, label) links listed on the service's index page "/"
INDEX_LINKS = web.AppKey("index_links", list)
#: optional callable(registry) -> bytes rendering /metrics instead of generate_latest (the
#: exporter serves snapshot families rendered once per refresh, not once per scrape)
METRICS_RENDER = web.AppKey("metrics_render", object)
