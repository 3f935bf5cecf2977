"""The built-in monitoring page, served by the exporter at ``/dashboard/monitoring``.

Server-rendered (Jinja2) with one small script that polls the operator API and this package's
JSON endpoints every 5 s; charts drawn by uPlot, vendored under ``static/`` (MIT, see
``static/uPlot.LICENSE``) so the page works offline. Mount it with :func:`setup_monitoring_page`.
"""

from .routes import setup_monitoring_page

__all__ = ["setup_monitoring_page"]
