"""Typed application keys of the sender service."""

from __future__ import annotations

from aiohttp import web

BROKER = web.AppKey("sender_broker", object)
METRICS = web.AppKey("sender_metrics", object)
TRACKING = web.AppKey("sender_tracking", object)
HTTP = web.AppKey("sender_http", object)
WEBHOOK = web.AppKey("sender_webhook", object)
#: background tasks of the API (big cancellations), cancelled at shutdown
TASKS = web.AppKey("sender_tasks", set)
