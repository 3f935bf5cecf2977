"""`python -m console ...`: the ``mailgenius`` command (console/commands.py)."""

import sys

from .commands import main

sys.exit(main())
