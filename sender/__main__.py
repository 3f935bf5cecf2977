"""`python -m sender`: parse settings, run the service."""

import sys

from mailgenius.cli import main

sys.exit(main(["serve", "sender", *sys.argv[1:]]))
