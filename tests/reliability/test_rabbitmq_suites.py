"""Both brokers: the core send and import suites also pass with ``BROKER_URL`` on RabbitMQ.

Runs the broker-dependent tests of tests/sender and tests/importer (API enqueue, real workers
consuming, kill -9 redelivery, pause/resume/cancel through the queue) in a child pytest with
``MAILGENIUS_TEST_BROKER_URL`` pointing at RabbitMQ (tests/conftest.py's ``settings`` fixture
takes it as the broker). ``MAILGENIUS_TEST_RABBITMQ_URL`` overrides the address.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import unavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_URL = os.environ.get("MAILGENIUS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
#: the tests whose behaviour depends on the broker (node ids, or -k expressions per file)
SELECTION = {
    "tests/sender/test_worker.py": "exactly_once or pause_resume_cancel",
    "tests/importer/test_jobs.py": "sigkill",
    # the upload enqueues its job, and /api/upload/monitoring reads the queue's depth from
    # whichever broker is configured (on RabbitMQ: ready messages of lead-import)
    "tests/importer/test_api.py": "upload_stores_file_queues_job",
}


def _reachable(url: str) -> bool:
    p = urlparse(url)
    try:
        with socket.create_connection((p.hostname or "127.0.0.1", p.port or 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("path", list(SELECTION))
def test_suite_passes_on_rabbitmq(path):
    if not _reachable(RABBITMQ_URL):
        unavailable(f"RabbitMQ at {RABBITMQ_URL}")
    if not (ROOT / path).exists():
        pytest.fail(f"{path} does not exist: the suite this test re-runs on RabbitMQ is gone")
    env = {**os.environ, "MAILGENIUS_TEST_BROKER_URL": RABBITMQ_URL}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", path, "-k", SELECTION[path]]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    # Then the selected tests ran (none skipped or deselected away) and passed
    assert proc.returncode == 0, f"{path} on RabbitMQ:\n{out[-5000:]}"
    assert " passed" in out and "skipped" not in out, out[-2000:]
