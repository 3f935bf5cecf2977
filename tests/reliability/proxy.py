"""A TCP fault proxy for the reliability suites.

It sits between our code and a real dependency (Postgres, Redis, RabbitMQ, an HTTP endpoint)
and injects network faults on demand::

    with FaultProxy("127.0.0.1", 5432) as pg:          # listens on a free local port
        url = with_port(database_url, pg.port)          # point the service at the proxy
        pg.set_mode("down")                             # new connects refused, open ones cut
        pg.set_mode("latency", latency=0.3)             # every chunk delayed 300 ms
        pg.set_mode("reset")                            # connects accepted then RST; open ones RST
        pg.set_mode("blackhole")                        # accepted, never answered
        pg.set_mode("pass")                             # normal forwarding again

The proxy runs its own asyncio loop in a daemon thread, so it serves in-process test apps (on
the test's loop), sync code and subprocesses alike; ``set_mode`` is thread-safe and returns
once the new mode is in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from urllib.parse import urlparse, urlunparse

#: the modes a proxy can be put in
MODES = ("pass", "down", "latency", "reset", "blackhole")
#: bytes read from one side at a time
CHUNK = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_port(url: str, port: int, host: str = "127.0.0.1") -> str:
    """``url`` with its host:port replaced (user, password, path and query kept)."""
    p = urlparse(url)
    auth = ""
    if p.username:
        auth = p.username + (f":{p.password}" if p.password else "") + "@"
    return urlunparse(p._replace(netloc=f"{auth}{host}:{port}"))


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)  # identity-hashed: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    def abort(self, rst: bool) -> None:
        for w in (self.client, self.upstream):
            if w is None:
                continue
            if rst:
                _rst(w)
            else:
                w.transport.abort()
        for t in self.tasks:
            t.cancel()


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, with injectable faults."""

    def __init__(self, target_host: str, target_port: int, *, port: int | None = None):
        self.target_host = target_host
        self.target_port = target_port
        self.port = port or _free_port()
        self.mode = "pass"
        self.latency = 0.0
        #: connections accepted so far (all modes), for assertions
        self.accepted = 0
        self._conns: set[_Conn] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{self.port}",
                                        daemon=True)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def url_for(self, url: str) -> str:
        """``url`` (of the target) rewritten to go through this proxy."""
        return with_port(url, self.port)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- faults ---------------------------------------------------------------------------------
    def set_mode(self, mode: str, *, latency: float = 0.0) -> None:
        """Switch mode; returns once it is in force. ``down`` closes the listener (connects are
        refused) and cuts open connections; ``reset`` RSTs open connections and every new one;
        ``blackhole`` keeps sockets open but forwards nothing; ``latency`` delays every chunk."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        self._call(self._set_mode(mode, latency))

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _set_mode(self, mode: str, latency: float) -> None:
        self.mode, self.latency = mode, latency
        if mode == "down":
            await self._close_listener()
            self._abort_all(rst=False)
        elif mode == "reset":
            self._abort_all(rst=True)
        if mode != "down" and self._server is None:
            await self._listen()

    def _abort_all(self, rst: bool) -> None:
        for conn in list(self._conns):
            conn.abort(rst)
        self._conns.clear()

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self._server = await asyncio.start_server(self._handle, sock=sock, backlog=512)

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _shutdown(self) -> None:
        await self._close_listener()
        self._abort_all(rst=False)

    # -- forwarding -----------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(writer)
        mode = self.mode
        if mode in ("down", "reset"):  # "down" only races with the listener being closed
            _rst(writer)
            return
        self._conns.add(conn)
        conn.tasks.append(asyncio.current_task())
        try:
            if mode == "blackhole":
                await self._drain_forever(reader)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), 5)
            except (OSError, TimeoutError):
                _rst(writer)
                return
            conn.upstream = up_writer
            a = asyncio.ensure_future(self._pump(reader, up_writer))
            b = asyncio.ensure_future(self._pump(up_reader, writer))
            conn.tasks += [a, b]
            done, pending = await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
            if pending and all(t.result() for t in done):  # clean half-close: let the other end finish
                await asyncio.wait(pending)
            for t in (a, b):
                t.cancel()
            for w in (writer, up_writer):
                w.transport.abort() if self.mode == "reset" else w.close()
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(conn)

    async def _drain_forever(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK):
            pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Copy one direction; True on a clean end of stream, False on a broken connection."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return True
                if self.mode == "blackhole":
                    continue  # swallowed: the peer waits for an answer that never comes
                if self.mode == "latency" and self.latency > 0:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            return False
