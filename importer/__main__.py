"""`python -m importer [--port N]`: parse settings, run the service (as `mailgenius serve importer`)."""

import sys

from mailgenius.serve import service_main

from .app import create_app

sys.exit(service_main("importer", create_app, sys.argv[1:]))
