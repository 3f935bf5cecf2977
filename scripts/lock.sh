#!/usr/bin/env bash
# Re-resolve the lock files from pyproject.toml (pip-tools, with hashes):
#   requirements/runtime.txt   the image's set: runtime dependencies + the `sink` extra
#   requirements/dev.txt       every extra (dev, build, sink): scripts/setup.sh and CI
# Usage: scripts/lock.sh             keep every pin that still satisfies pyproject.toml
#        scripts/lock.sh --upgrade   move every pin to the newest allowed release
#        scripts/lock.sh --upgrade-package NAME   move one
# dev.txt is constrained by runtime.txt, so a package has the same version in both.
set -euo pipefail
cd "$(dirname "$0")/.."
compile() {
  .venv/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-find-links "$@" pyproject.toml
}
compile "$@" --extra sink -o requirements/runtime.txt
compile "$@" --extra sink --extra build --extra dev -c requirements/runtime.txt -o requirements/dev.txt
echo "lock files written; run scripts/setup.sh to install them" >&2
