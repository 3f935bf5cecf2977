"""The background thread of the sweeper and the bounce mailbox poller (sender/periodic.py), on
real Postgres and Redis: it ticks every interval, survives a failing tick, and stops at once."""

from __future__ import annotations

import logging
import threading
import time

from sender.periodic import PeriodicThread


class Counter(PeriodicThread):
    failure = "counter tick failed"

    def __init__(self, settings):
        super().__init__("test-periodic", settings)
        self.ticks: list[int] = []
        self.ticked = threading.Event()

    @property
    def interval(self) -> float:
        return 0.05

    async def tick(self) -> None:
        n = len(self.ticks) + 1
        self.ticks.append(await self.pool.fetchval("SELECT $1::int", n))
        await self.redis.ping()
        if n == 2:
            raise RuntimeError("a dependency down")
        if n >= 4:
            self.ticked.set()


def test_ticks_every_interval_survives_a_failure_and_stops(settings, caplog):
    caplog.set_level(logging.WARNING, logger="sender.periodic")
    thread = Counter(settings)
    thread.start()
    try:
        assert thread.ticked.wait(30), thread.ticks
    finally:
        thread.stop_event.set()
    started = time.monotonic()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert thread.ticks[:4] == [1, 2, 3, 4]
    assert [r.getMessage() for r in caplog.records] == ["counter tick failed"]
    assert caplog.records[0].error == "RuntimeError: a dependency down"
    assert thread.pool._closed
