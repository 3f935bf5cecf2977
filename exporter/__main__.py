"""`python -m exporter [--port N]`: parse settings, run the service (as `mailgenius serve exporter`)."""

import sys

from mailgenius.serve import service_main

from .app import create_app

sys.exit(service_main("exporter", create_app, sys.argv[1:]))
