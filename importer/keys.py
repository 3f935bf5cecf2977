"""Typed application keys of the importer service."""

from __future__ import annotations

import dramatiq
from aiohttp import web
from prometheus_client import Counter

#: the dramatiq broker the API enqueues import jobs on
BROKER = web.AppKey("importer_broker", dramatiq.Broker)
#: mailgenius_upload_bytes_total on the app's registry
UPLOAD_BYTES = web.AppKey("importer_upload_bytes", Counter)
