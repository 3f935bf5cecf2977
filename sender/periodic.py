"""A background thread of a sender worker process that runs one async task every interval.

The stalled-campaign sweeper (sender/sweeper.py) and the bounce mailbox poller
(sender/mailbox.py) are both one of these: a daemon thread with its own event loop, a Redis
client and a one-connection Postgres pool (opened on the first tick, and again on the next one
when Postgres was down), a tick that may fail (a dependency down: logged, tried again next
interval) and a stop event the worker's middleware sets at shutdown (the wait between ticks
ends at once, the current tick finishes).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import asyncpg

from mailgenius.cache import create_redis


class PeriodicThread(threading.Thread):
    """Runs :meth:`tick` every :attr:`interval` seconds in its own event loop until
    :attr:`stop_event` is set. Subclasses set :attr:`log` (their module's logger) and
    :attr:`failure` (the warning logged when a tick raises), and implement :meth:`tick`."""

    log = logging.getLogger(__name__)
    failure = "periodic task failed"

    def __init__(self, name: str, settings):
        super().__init__(name=name, daemon=True)
        self.settings = settings
        self.stop_event = threading.Event()
        #: open while the loop runs (the pool from the first tick that reached Postgres)
        self.pool = None
        self.redis = None

    @property
    def interval(self) -> float:
        raise NotImplementedError

    async def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        self.redis = create_redis(self.settings.redis_url)
        try:
            while not self.stop_event.is_set():
                try:
                    if self.pool is None:
                        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=0, max_size=1)
                    await self.tick()
                except Exception as exc:  # a dependency down: try again next interval
                    self.log.warning(self.failure, extra={"error": f"{type(exc).__name__}: {exc}"})
                await asyncio.get_running_loop().run_in_executor(None, self.stop_event.wait, self.interval)
        finally:
            if self.pool is not None:
                await self.pool.close()
            await self.redis.aclose()
