#!/usr/bin/env bash
# Idempotent machine set-up for `make run` and `make test` on Debian:
#   1. the Debian packages we need (only the missing ones; apt-get update only when installing),
#   2. .venv with the locked dependencies and the project (re-installed only when
#      requirements/dev.txt or pyproject.toml changed),
#   3. PostgreSQL and Redis started when nothing answers at the configured URLs,
#   4. the database created and migrated.
# Usage: scripts/setup.sh [--test]   (--test adds what the test suites need, e.g. chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# -- 1. Debian packages ---------------------------------------------------------------------
pkgs=(postgresql postgresql-contrib redis-server prometheus prometheus-alertmanager
      prometheus-postgres-exporter prometheus-redis-exporter prometheus-node-exporter
      python3-venv curl)
# chromium: the monitoring page tests; systemd: `systemd-analyze verify` of deploy/systemd
if [ "$want_test" = 1 ]; then pkgs+=(chromium systemd); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  # keep package scripts from starting daemons: we start what we need ourselves, on our ports
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi

# -- 2. virtualenv --------------------------------------------------------------------------
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
# exact versions from the lock (requirements/dev.txt, hashes checked), then the project itself;
# skipped when neither the lock nor pyproject.toml changed since the last install
stamp=.venv/.installed
want=$(cat pyproject.toml requirements/dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the locked dependencies and the project into .venv"
  .venv/bin/pip install -q --require-hashes -r requirements/dev.txt
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

# -- 3. PostgreSQL and Redis ----------------------------------------------------------------
DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mailgenius}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}

pg_host=$(.venv/bin/python -c "from urllib.parse import urlparse as u; p=u('$DATABASE_URL'); print(p.hostname or '127.0.0.1', p.port or 5432)")
read -r PGH PGP <<<"$pg_host"
if ! pg_isready -q -h "$PGH" -p "$PGP" 2>/dev/null; then
  log "PostgreSQL not answering on $PGH:$PGP: starting a local cluster"
  ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $2}' | grep -qx main; then
    $SUDO pg_createcluster "$ver" main -p "$PGP" >/dev/null
  fi
  hba=$(ls /etc/postgresql/"$ver"/main/pg_hba.conf)
  if ! grep -q "mailgenius-local-trust" "$hba"; then
    # local development cluster: trust loopback connections (docs/design.md: trust auth on 127.0.0.1)
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust # mailgenius-local-trust\nhost all all ::1/128 trust # mailgenius-local-trust' "$hba"
  fi
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || $SUDO pg_ctlcluster "$ver" main start
  pg_started_here="$ver"
  for _ in $(seq 1 30); do pg_isready -q -h "$PGH" -p "$PGP" && break; sleep 0.5; done
fi

read -r RH RP <<<"$(.venv/bin/python -c "from urllib.parse import urlparse as u; p=u('$REDIS_URL'); print(p.hostname or '127.0.0.1', p.port or 6379)")"
if ! redis-cli -h "$RH" -p "$RP" ping >/dev/null 2>&1; then
  log "Redis not answering on $RH:$RP: starting one"
  mkdir -p var/redis
  redis-server --daemonize yes --bind "$RH" --port "$RP" --save "" --appendonly no \
    --dir "$PWD/var/redis" --logfile "$PWD/var/redis/redis.log"
  for _ in $(seq 1 30); do redis-cli -h "$RH" -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.2; done
fi

# -- 4. database ----------------------------------------------------------------------------
.venv/bin/mailgenius migrate >&2
# -- 5. pg_stat_statements (for `mailgenius slow-queries`) -----------------------------------
# Preload it with ALTER SYSTEM when the library is installed and we are superuser. A server that
# was already running picks it up at its next restart (we never restart someone's server); one
# this script started just now is restarted at once.
preload=$(psql "$DATABASE_URL" -Atc "SHOW shared_preload_libraries" 2>/dev/null || echo "?")
if [ "$preload" != "?" ] && [[ "$preload" != *pg_stat_statements* ]] \
   && [ "$(psql "$DATABASE_URL" -Atc "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'" 2>/dev/null)" = 1 ]; then
  if psql "$DATABASE_URL" -qAtc "ALTER SYSTEM SET shared_preload_libraries = '${preload:+$preload,}pg_stat_statements'" >/dev/null 2>&1; then
    if [ -n "${pg_started_here:-}" ]; then
      $SUDO pg_ctlcluster --skip-systemctl-redirect "$pg_started_here" main restart || $SUDO pg_ctlcluster "$pg_started_here" main restart
      for _ in $(seq 1 30); do pg_isready -q -h "$PGH" -p "$PGP" && break; sleep 0.5; done
    else
      log "pg_stat_statements will be loaded at PostgreSQL's next restart (mailgenius slow-queries needs it)"
    fi
  fi
fi
# -- 6. test-only: Grafana's LogQL grammar (npm), for the dashboards' LogQL syntax check --------
if [ "$want_test" = 1 ] && command -v npm >/dev/null 2>&1 \
   && [ ! -d tests/dashboards/logql/node_modules/@grafana/lezer-logql ]; then
  log "installing Grafana's LogQL grammar for tests/dashboards (npm ci)"
  npm ci --prefix tests/dashboards/logql --no-audit --no-fund --silent >&2
fi
log "ready"
