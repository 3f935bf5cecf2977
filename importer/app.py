"""The importer service: `create_app(settings)` builds the aiohttp application."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from mailgenius.settings import Settings
from mailgenius.web import base_app


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    app = base_app(settings, "importer", registry=registry)
    return app
