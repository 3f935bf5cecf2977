"""`python -m sender [--port N]`: parse settings, run the service (as `mailgenius serve sender`)."""

import sys

from mailgenius.serve import service_main

from .app import create_app

sys.exit(service_main("sender", create_app, sys.argv[1:]))
