"""`python -m importer`: parse settings, run the service."""

import sys

from mailgenius.cli import main

sys.exit(main(["serve", "importer", *sys.argv[1:]]))
