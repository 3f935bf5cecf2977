"""The importer service: `create_app(settings)` builds the aiohttp application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from mailgenius import keys as mkeys
from mailgenius.broker import build_broker
from mailgenius.health import disk_check
from mailgenius.metrics import QUEUE_IMPORT, UPLOAD_BYTES, bare_name
from mailgenius.procmetrics import service_registry
from mailgenius.queues import queue_check, workers_check
from mailgenius.settings import Settings
from mailgenius.web import add_routes, base_app

from . import keys
from .routes import FORM_OVERHEAD, ROUTES

#: the upload folder is unhealthy below this much free space (a 2M-lead CSV is ~170 MB)
UPLOAD_MIN_FREE_BYTES = 512 << 20


def broker_ctx(settings: Settings):
    """cleanup_ctx: the dramatiq broker the API enqueues on (closed at shutdown)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        broker = build_broker(settings)
        app[keys.BROKER] = broker
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, broker.close)

    return ctx


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry if registry is not None else service_registry()
    # uploads are streamed to disk with request.multipart(), so client_max_size only matters
    # for the small JSON bodies; it is raised to the cap anyway so no code path reads less
    app = base_app(settings, "importer", registry=registry,
                   client_max_size=settings.upload_max_bytes + FORM_OVERHEAD)
    app[keys.UPLOAD_BYTES] = Counter(bare_name(UPLOAD_BYTES, "_total"), "Bytes of CSV uploads stored.",
                                     registry=registry)
    app.cleanup_ctx.append(broker_ctx(settings))
    health = app[mkeys.HEALTH]
    health.add("queue", queue_check(lambda: app[mkeys.REDIS], settings, QUEUE_IMPORT))
    health.add("upload", disk_check(settings.upload_dir, min_free_bytes=UPLOAD_MIN_FREE_BYTES))
    # no live worker degrades the service; uploads are still accepted and queued
    health.add("workers", workers_check(lambda: app[mkeys.REDIS], settings, QUEUE_IMPORT), critical=False)
    add_routes(app, ROUTES)
    return app
