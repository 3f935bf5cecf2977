#!/usr/bin/env bash
# Start the whole stack in the foreground from the Procfile (honcho); Ctrl-C stops everything.
#
# Every port and address comes from the environment (README "Configuration"; defaults in
# docs/design.md). `mailgenius stack-prepare` checks that every port is free (a taken one is reported
# by name, with the variable that moves it), renders the Prometheus and Alertmanager configs for
# the chosen ports into $MAILGENIUS_DATA_DIR/run/, writes the settled variables to
# $MAILGENIUS_DATA_DIR/run/stack.env (honcho loads it; `mailgenius status|demo|report` read it)
# and prints where each thing is.
set -euo pipefail
cd "$(dirname "$0")/.."

# Slack / PagerDuty / SMTP secrets from the environment into the files alertmanager.yml names
# (nothing is written for unset variables; those channels then fail loudly in Alertmanager's log)
.venv/bin/mailgenius alerting secrets --dir var/secrets >/dev/null 2>&1 || true
.venv/bin/mailgenius stack-prepare --root . || exit $?
data_dir=${MAILGENIUS_DATA_DIR:-./var}
# honcho, with more than its fixed 5 s between SIGTERM and SIGKILL at Ctrl-C: a worker finishing
# its current message, or Prometheus writing its head block, may need longer
exec .venv/bin/python -c 'import sys, honcho.manager as m; m.KILL_WAIT = int(sys.argv.pop(1)); sys.argv[0] = "honcho"
from honcho.command import main; main()' "${MAILGENIUS_STOP_TIMEOUT:-20}" start -f Procfile -e "$data_dir/run/stack.env"
