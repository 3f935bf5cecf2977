"""`python -m exporter`: parse settings, run the service."""

import sys

from mailgenius.cli import main

sys.exit(main(["serve", "exporter", *sys.argv[1:]]))
