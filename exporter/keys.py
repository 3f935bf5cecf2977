"""Typed application keys of the exporter (the kernel's shared ones live in mailgenius.keys)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

#: mailgenius.settings.ExporterSettings (settings.exporter)
CONFIG = web.AppKey("exporter_config", "ExporterSettings")
#: exporter.collectors.Refresher: the background snapshots the collectors read
REFRESHER = web.AppKey("exporter_refresher", "Refresher")
#: one shared HTTP client (health of other services, Prometheus, Alertmanager)
HTTP = web.AppKey("exporter_http", aiohttp.ClientSession)
