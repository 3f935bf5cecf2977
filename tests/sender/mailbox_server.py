"""What the test mailbox servers (tests/sender/pop3_server.py, tests/sender/imap_server.py) share:
a line-based TCP server on asyncio on a free port of 127.0.0.1, one credential, a maildrop of
uid -> message in arrival order, and the counters the bounce mailbox tests read (``sessions``,
``quits``, ``retrieved``; ``drop_after_retr`` cuts a session after that many retrievals, a
mailbox failing mid-poll). A subclass sets :attr:`greeting` and implements :meth:`converse`."""

from __future__ import annotations

import asyncio
import itertools


class MailboxServer:
    #: the first line a session gets
    greeting = ""

    def __init__(self, user: str = "bounces", password: str = "secret"):
        self.user = user
        self.password = password
        self.maildrop: dict[str, bytes] = {}  # uid -> message, in arrival order
        self._uids = itertools.count(1)
        self.sessions = 0
        self.quits = 0
        self.retrieved: list[str] = []
        self.drop_after_retr: int | None = None
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def uid(self, n: int) -> str:
        """The uid of the ``n``-th message delivered."""
        return str(n)

    def deliver(self, raw: bytes) -> str:
        uid = self.uid(next(self._uids))
        self.maildrop[uid] = raw
        return uid

    async def start(self):
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            self.reply(writer, self.greeting)
            await self.converse(reader, writer)
        finally:
            writer.close()

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One session after the greeting, until the client leaves or the server drops it."""
        raise NotImplementedError

    @staticmethod
    def reply(writer: asyncio.StreamWriter, line: str | bytes) -> None:
        writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

    @staticmethod
    async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """The next command line (CRLF stripped), once the replies so far are flushed; None when
        the client hung up."""
        await writer.drain()
        line = await reader.readline()
        if not line:
            return None
        return line.decode("latin-1").rstrip("\r\n")
