"""Typed application keys of the monitoring page."""

from __future__ import annotations

from aiohttp import ClientSession, web

#: aiohttp client for Prometheus and Alertmanager (short timeouts)
HTTP = web.AppKey("monitoring_page_http", ClientSession)
#: the Jinja2 environment of the templates/ folder
JINJA = web.AppKey("monitoring_page_jinja", object)
#: range name -> (expires monotonic, body): one Prometheus round per range and period, however
#: many operators have the page open
SERIES_CACHE = web.AppKey("monitoring_page_series_cache", dict)
