"""The sender service: `create_app(settings)` builds the aiohttp application."""

from __future__ import annotations

import logging
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from svix.webhooks import Webhook

from mailgenius import keys
from mailgenius.broker import build_broker
from mailgenius.cache import rkey
from mailgenius.health import DEGRADED, CheckResult
from mailgenius.metrics import QUEUE_EMAIL
from mailgenius.queues import queue_check, workers_check
from mailgenius.settings import Settings, SettingsError
from mailgenius.web import add_routes, base_app

from . import email_settings
from . import keys as skeys
from .metrics import SenderMetrics
from .providers import ResendProvider, SmtpProvider
from .routes import routes
from .tracking import Tracker, load_secret

log = logging.getLogger(__name__)


def _webhook(settings: Settings) -> Webhook | None:
    if not settings.resend_webhook_secret:
        return None
    try:
        return Webhook(settings.resend_webhook_secret)
    except Exception as exc:
        raise SettingsError("MAILGENIUS_RESEND_WEBHOOK_SECRET", f"not a Svix secret (whsec_...): {exc}") from None


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    app = base_app(settings, "sender", registry=registry)
    app[skeys.METRICS] = SenderMetrics(app[keys.REGISTRY])
    app[skeys.WEBHOOK] = _webhook(settings)
    app[skeys.TRACKING] = {"tracker": None}  # filled at start-up, or on first use
    app[skeys.TASKS] = set()

    async def broker_ctx(app):
        broker = build_broker(settings)
        app[skeys.BROKER] = broker
        yield
        broker.close()

    async def http_ctx(app):
        async with aiohttp.ClientSession() as session:
            app[skeys.HTTP] = session
            yield

    async def tasks_ctx(app):
        yield
        for task in list(app[skeys.TASKS]):
            task.cancel()

    async def startup_ctx(app):
        # best effort: with Postgres or Redis down the service still starts (and reports it)
        try:
            secret = await load_secret(app[keys.DB], settings.tracking_secret)
            app[skeys.TRACKING]["tracker"] = Tracker(secret, settings.public_url)
            values = await email_settings.load(app[keys.DB], settings)
            await email_settings.mirror(app[keys.REDIS], settings, values)
        except Exception as exc:
            log.warning("sender start-up deferred", extra={"error": f"{type(exc).__name__}: {exc}"})
        yield

    app.cleanup_ctx.extend([broker_ctx, http_ctx, startup_ctx, tasks_ctx])
    health = app[keys.HEALTH]
    health.add("queue", queue_check(lambda: app[keys.REDIS], settings, QUEUE_EMAIL))
    health.add("workers", workers_check(lambda: app[keys.REDIS], settings, QUEUE_EMAIL))
    health.add("email", email_check(app, settings), critical=False, timeout=max(settings.health_timeout, 2.5))
    add_routes(app, routes())
    return app


async def failure_ratio(redis, settings, minutes: int | None = None) -> tuple[int, int]:
    """Sent and failed emails of the last ``minutes`` (default ``settings.sender.health_window_minutes``)."""
    minutes = settings.sender.health_window_minutes if minutes is None else minutes
    now = int(time.time() // 60)
    pipe = redis.pipeline(transaction=False)
    for m in range(now - minutes + 1, now + 1):
        pipe.hmget(rkey(settings, "sender", "stats", str(m)), "sent", "failed")
    sent = failed = 0
    for s, f in await pipe.execute():
        sent += int(s or 0)
        failed += int(f or 0)
    return sent, failed


def email_check(app: web.Application, settings: Settings):
    """Provider reachable, and the failure ratio of the last minutes below the threshold."""

    async def check():
        values = await email_settings.load(app[keys.DB], settings)
        name = values["provider"]
        if name == "resend":
            reach = await ResendProvider(app[skeys.HTTP], settings.resend_base_url, settings.resend_api_key,
                                         timeout=settings.sender.provider_timeout).check()
        else:
            reach = await SmtpProvider(settings.smtp_host, settings.smtp_port, timeout=settings.sender.provider_timeout,
                                       opportunistic_tls=settings.sender.smtp_opportunistic_tls).check()
        sent, failed = await failure_ratio(app[keys.REDIS], settings)
        total = sent + failed
        ratio = failed / total if total else 0.0
        detail = (f"{reach}; last {settings.sender.health_window_minutes} min: {sent} sent, {failed} failed "
                  f"({ratio:.1%}); rate_limit {values['rate_limit'] or 'unlimited'}")
        if ratio > settings.sender.health_failure_ratio:
            return CheckResult(DEGRADED, detail)
        return detail

    return check
