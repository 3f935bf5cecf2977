#!/usr/bin/env bash
# Start the whole stack in the foreground from the Procfile (honcho); Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/honcho start -f Procfile
