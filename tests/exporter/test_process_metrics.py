"""Metrics hygiene on real processes: every Python process exports process_* and python_*
(the dramatiq workers per process, from their multiprocess exposition), and no _created series."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.stack import Stack

pytestmark = [pytest.mark.slow]


@pytest.fixture
def stack(exporter_settings, tmp_path, pool):
    s = Stack(exporter_settings, tmp_path)
    yield s
    s.stop_all()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


def test_http_service_exports_process_and_python_metrics_without_created(stack):
    stack.start_service("exporter")
    text = scrape(stack.url("exporter") + "/metrics")
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
                 "process_open_fds", "python_info", "python_gc_collections_total"):
        assert samples(text, name), name
    assert not re.search(r"^\w+_created[ {]", text, re.M), "a _created series"


def test_worker_exports_process_metrics_of_each_of_its_processes(stack):
    # Given a sender worker group of two processes
    stack.start_worker("sender", processes=2, threads=1)
    text = scrape(f"http://127.0.0.1:{stack.ports['sender-worker']}/")
    # Then its exposition has process_* of the master and each worker process, by pid
    rss = samples(text, "process_resident_memory_bytes")
    pids = {re.search(r'pid="(\d+)"', line).group(1) for line in rss}
    assert len(pids) >= 3, rss  # master + 2 worker processes (+ the exposition fork)
    assert all(float(line.rsplit(" ", 1)[1]) > 1e6 for line in rss)
    assert len(samples(text, "process_cpu_seconds_total")) == len(pids)
    assert samples(text, "python_info")
    # and the multiprocess metrics still, with no _created series
    assert "mailgenius_emails_sent_total" in text
    assert not re.search(r"^\w+_created[ {]", text, re.M), "a _created series"
