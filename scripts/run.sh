#!/usr/bin/env bash
# Start the whole stack in the foreground from the Procfile, under our supervisor
# (console/supervisor.py); Ctrl-C stops everything.
#
# Every port and address comes from the environment (README "Configuration"; defaults in
# docs/design.md). `mailgenius stack-prepare` checks that every port is free (a taken one is reported
# by name, with the variable that moves it), renders the Prometheus and Alertmanager configs for
# the chosen ports into $MAILGENIUS_DATA_DIR/run/, writes the settled variables to
# $MAILGENIUS_DATA_DIR/run/stack.env (the supervisor loads it; `mailgenius status|demo|report`
# read it) and prints where each thing is.
#
# The supervisor restarts a process that dies (backoff 1 s doubling to 30 s), never stops the
# others because of it, writes each process's output as JSON lines to
# $MAILGENIUS_DATA_DIR/log/<process>.log (rotated by size; `mailgenius logs` reads them) and, at
# Ctrl-C, stops every process within MAILGENIUS_STOP_TIMEOUT seconds (default 20), orphans
# included.
set -euo pipefail
cd "$(dirname "$0")/.."

# Slack / PagerDuty / SMTP secrets from the environment into the files alertmanager.yml names
# (nothing is written for unset variables; those channels then fail loudly in Alertmanager's log)
.venv/bin/mailgenius alerting secrets --dir var/secrets >/dev/null 2>&1 || true
.venv/bin/mailgenius stack-prepare --root . || exit $?
data_dir=${MAILGENIUS_DATA_DIR:-./var}
exec .venv/bin/python -m console.supervisor -f Procfile -e "$data_dir/run/stack.env" --log-dir "$data_dir/log"
