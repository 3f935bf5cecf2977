"""A bounded pool of SMTP connections to one relay (one pool per worker process and relay).

Invariant: at most ``size`` connections are open at any time, idle or in use. A caller holds one
of ``size`` slots from :meth:`SmtpPool.acquire` to :meth:`SmtpPool.release`; it reuses an idle
connection when there is one and opens a new one only when there is none, so idle + in use never
exceeds the number of slots. Every connection that is not handed back for reuse (an error, a
``421``, a drop) is closed on release: nothing is left half-open for the relay to count.

``open`` is the number of connections open now; ``on_change(open)`` is called after every change
(the sender sets its ``mailgenius_smtp_connections`` gauge from it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiosmtplib


class SmtpPool:
    def __init__(self, connect: Callable[[], Awaitable[aiosmtplib.SMTP]], size: int,
                 on_change: Callable[[int], None] | None = None):
        if size < 1:
            raise ValueError("an SMTP pool holds at least one connection")
        self.size = size
        self._connect = connect
        self._on_change = on_change
        self._sem = asyncio.Semaphore(size)
        self._idle: list[aiosmtplib.SMTP] = []
        self.open = 0
        #: the most connections ever open at once (benchmarks, tests)
        self.peak = 0
        self._closed = False

    def _changed(self, delta: int) -> None:
        self.open += delta
        self.peak = max(self.peak, self.open)
        if self._on_change is not None:
            self._on_change(self.open)

    async def acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A connection and whether it was just opened. Raises what connecting raised (the slot
        is given back and the half-open client closed)."""
        await self._sem.acquire()
        try:
            while self._idle:
                client = self._idle.pop()
                if client.is_connected:
                    return client, False
                self._discard(client)
            self._changed(+1)  # counted before the connect: a half-open socket is open too
            try:
                client = await self._connect()
            except BaseException:
                self._changed(-1)
                raise
            return client, True
        except BaseException:
            self._sem.release()
            raise

    def release(self, client: aiosmtplib.SMTP, *, reuse: bool) -> None:
        """Give the slot back; the connection stays open for reuse only if asked and still up."""
        try:
            if reuse and not self._closed and client.is_connected:
                self._idle.append(client)
            else:
                self._discard(client)
        finally:
            self._sem.release()

    def _discard(self, client: aiosmtplib.SMTP) -> None:
        client.close()  # closes the transport whatever state the conversation is in
        self._changed(-1)

    async def close(self) -> None:
        """Close the idle connections politely (QUIT), and refuse reuse from now on."""
        self._closed = True
        while self._idle:
            client = self._idle.pop()
            try:
                await asyncio.wait_for(client.quit(), 2)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self._discard(client)
