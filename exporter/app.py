"""The exporter service: `create_app(settings)` builds the aiohttp application.

It serves ``/metrics`` (the kernel's HTTP metrics plus the snapshot collectors of
:mod:`exporter.collectors`) and the operator API of :mod:`exporter.routes`: aggregated health,
the operator summary, queue status and admin, the Alertmanager webhook and incidents.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from mailgenius import keys as k
from mailgenius.procmetrics import service_registry
from mailgenius.settings import Settings
from mailgenius.web import add_routes, base_app

from . import keys as ek
from .collectors import Context, Refresher, SnapshotCollector
from .health import add_checks
from .monitoring_page import setup_monitoring_page
from .routes import ROUTES

log = logging.getLogger(__name__)


def http_ctx():
    """cleanup_ctx: one HTTP client for health relays and Prometheus queries."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            app[ek.HTTP] = session
            yield

    return ctx


def refresher_ctx(refresher: Refresher):
    """cleanup_ctx: the background snapshot refresh runs while the app runs (after the pool and
    Redis contexts, which base_app appended first, so it stops before they close)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        refresher.start()
        yield
        await refresher.stop()

    return ctx


def health_loop_ctx(config):
    """cleanup_ctx: run the aggregated health checks every ``health_seconds`` so that
    ``mailgenius_health_check_up{service="exporter", check}`` (sender, importer, workers, queue,
    Postgres, Redis, Prometheus, Alertmanager) is current for Prometheus even when nobody calls
    /api/health."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async def loop():
            while True:
                # first run one interval after start: short-lived apps (tests) never call out
                await asyncio.sleep(config.health_seconds)
                try:
                    await app[k.HEALTH].run()
                except Exception:  # pragma: no cover - run() turns failures into results
                    log.exception("background health run failed")

        task = asyncio.get_running_loop().create_task(loop(), name="exporter-health")
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    return ctx


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry if registry is not None else service_registry()
    app = base_app(settings, "exporter", registry=registry)
    config = settings.exporter
    app[ek.CONFIG] = config
    refresher = Refresher(Context(settings, config, lambda: app[k.DB], lambda: app[k.REDIS]))
    app[ek.REFRESHER] = refresher
    collector = SnapshotCollector(refresher)
    registry.register(collector)
    app[k.METRICS_RENDER] = collector.render  # snapshot families formatted once per refresh
    app.cleanup_ctx.append(http_ctx())
    app.cleanup_ctx.append(refresher_ctx(refresher))
    app.cleanup_ctx.append(health_loop_ctx(config))
    add_checks(app[k.HEALTH], settings=settings, config=config, get_redis=lambda: app[k.REDIS],
               get_session=lambda: app[ek.HTTP])
    add_routes(app, ROUTES)
    setup_monitoring_page(app)
    return app
