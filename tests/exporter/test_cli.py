"""`mailgenius queue` and `mailgenius incidents` as an operator runs them (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailgenius import metrics as m
from mailgenius.worker import enqueue

MAILGENIUS = str(Path(sys.executable).parent / "mailgenius")


def run(settings, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGENIUS_")}
    env.update({"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
                "BROKER_URL": settings.broker_url, "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix})
    return subprocess.run([MAILGENIUS, *argv], env=env, capture_output=True, text=True, timeout=60)


async def test_queue_status_and_clear_from_the_shell(exporter_settings, broker, pool):
    for i in range(4):
        enqueue(broker, m.QUEUE_IMPORT, "run_import", i)
    out = run(exporter_settings, "queue", "status")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith(m.QUEUE_IMPORT))
    assert line.split()[1:4] == ["4", "0", "0"]

    out = run(exporter_settings, "queue", "clear", "--queue", m.QUEUE_IMPORT, "--type", "waiting", "--dry-run")
    assert out.returncode == 0 and "4 waiting message(s) of lead-import would be cleared" in out.stdout
    assert broker.client.llen(f"{broker.namespace}:{m.QUEUE_IMPORT}") == 4
    out = run(exporter_settings, "queue", "clear", "--queue", m.QUEUE_IMPORT, "--type", "waiting")
    assert out.returncode == 0 and "4 waiting message(s) of lead-import cleared" in out.stdout
    assert broker.client.llen(f"{broker.namespace}:{m.QUEUE_IMPORT}") == 0

    out = run(exporter_settings, "queue", "retry", "--type", "waiting")
    assert out.returncode == 2 and "only failed" in out.stderr


async def test_incidents_from_the_shell(exporter_settings, pool):
    await pool.execute(
        """INSERT INTO incidents (fingerprint, alertname, severity, status, started_at, resolved_at)
           VALUES ('f1', 'HighAPILatency', 'warning', 'resolved', now() - interval '1 hour', now() - interval '50 minutes')""")
    out = run(exporter_settings, "incidents")
    assert out.returncode == 0, out.stderr
    assert "HighAPILatency" in out.stdout and "MTTR 600s" in out.stdout
