"""A small IMAP4rev1 server (RFC 3501 subset) on asyncio for the bounce mailbox tests: a test
peer, not product code. CAPABILITY, LOGIN, SELECT, UID SEARCH, UID FETCH (BODY.PEEK[] / RFC822),
UID STORE +FLAGS (\\Deleted), EXPUNGE, CLOSE, NOOP, LOGOUT. Flags are stored at once (as real
servers do) and messages leave only at EXPUNGE / CLOSE. Same interface as :class:`Pop3Server`
(``maildrop``, ``deliver``, ``quits``, ``drop_after_retr``) so the tests run on both."""

from __future__ import annotations

import asyncio
import itertools
import re


class ImapServer:
    def __init__(self, user: str = "bounces", password: str = "secret"):
        self.user = user
        self.password = password
        self.maildrop: dict[str, bytes] = {}  # uid (as text) -> message
        self.flags: dict[str, set[str]] = {}
        self._uids = itertools.count(1)
        self.sessions = 0
        self.quits = 0
        self.retrieved: list[str] = []
        self.drop_after_retr: int | None = None
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def deliver(self, raw: bytes) -> str:
        uid = str(next(self._uids))
        self.maildrop[uid] = raw
        self.flags[uid] = set()
        return uid

    async def start(self) -> ImapServer:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _expunge(self) -> list[int]:
        gone = []
        for seq, uid in enumerate(list(self.maildrop), start=1):
            if "\\Deleted" in self.flags.get(uid, set()):
                gone.append(seq - len(gone))
                del self.maildrop[uid]
                self.flags.pop(uid, None)
        return gone

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1

        def send(line: str | bytes) -> None:
            writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")

        send("* OK IMAP4rev1 test server ready")
        authed = selected = False
        fetches = 0
        try:
            while True:
                await writer.drain()
                line = await reader.readline()
                if not line:
                    return
                text = line.decode("latin-1").rstrip("\r\n")
                tag, _, rest = text.partition(" ")
                cmd, _, args = rest.partition(" ")
                cmd = cmd.upper()
                if cmd == "UID":
                    sub, _, args = args.partition(" ")
                    cmd = "UID " + sub.upper()
                if cmd == "CAPABILITY":
                    send("* CAPABILITY IMAP4rev1 AUTH=PLAIN")
                    send(f"{tag} OK CAPABILITY completed")
                elif cmd == "LOGIN":
                    parts = [p.strip('"') for p in args.split(" ")]
                    if parts == [self.user, self.password]:
                        authed = True
                        send(f"{tag} OK LOGIN completed")
                    else:
                        send(f"{tag} NO [AUTHENTICATIONFAILED] invalid credentials")
                elif cmd == "LOGOUT":
                    self.quits += 1
                    send("* BYE logging out")
                    send(f"{tag} OK LOGOUT completed")
                    await writer.drain()
                    return
                elif cmd == "NOOP":
                    send(f"{tag} OK NOOP completed")
                elif not authed:
                    send(f"{tag} NO log in first")
                elif cmd == "SELECT":
                    selected = True
                    send(f"* {len(self.maildrop)} EXISTS")
                    send("* 0 RECENT")
                    send("* FLAGS (\\Deleted \\Seen)")
                    send("* OK [UIDVALIDITY 1] UIDs valid")
                    send(f"{tag} OK [READ-WRITE] SELECT completed")
                elif not selected:
                    send(f"{tag} NO select a mailbox first")
                elif cmd == "UID SEARCH":
                    crit = args.upper()
                    uids = [u for u in self.maildrop
                            if not ("UNDELETED" in crit and "\\Deleted" in self.flags[u])]
                    send("* SEARCH" + "".join(f" {u}" for u in uids))
                    send(f"{tag} OK SEARCH completed")
                elif cmd == "UID FETCH":
                    uid, _, _items = args.partition(" ")
                    if uid not in self.maildrop:
                        send(f"{tag} OK FETCH completed")  # RFC 3501: a missing UID is no error
                        continue
                    if self.drop_after_retr is not None and fetches >= self.drop_after_retr:
                        writer.close()
                        return
                    fetches += 1
                    raw = self.maildrop[uid]
                    seq = list(self.maildrop).index(uid) + 1
                    self.retrieved.append(uid)
                    writer.write(f"* {seq} FETCH (UID {uid} BODY[] {{{len(raw)}}}\r\n".encode() + raw + b")\r\n")
                    send(f"{tag} OK FETCH completed")
                elif cmd == "UID STORE":
                    m = re.match(r"(\d+) \+FLAGS(?:\.SILENT)? \((.*)\)", args, re.IGNORECASE)
                    if m is None or m.group(1) not in self.maildrop:
                        send(f"{tag} BAD unsupported STORE")
                        continue
                    self.flags[m.group(1)].update(m.group(2).split())
                    seq = list(self.maildrop).index(m.group(1)) + 1
                    send(f"* {seq} FETCH (UID {m.group(1)} FLAGS ({' '.join(sorted(self.flags[m.group(1)]))}))")
                    send(f"{tag} OK STORE completed")
                elif cmd in ("EXPUNGE", "CLOSE"):
                    for seq in self._expunge():
                        if cmd == "EXPUNGE":
                            send(f"* {seq} EXPUNGE")
                    if cmd == "CLOSE":
                        selected = False
                    send(f"{tag} OK {cmd} completed")
                else:
                    send(f"{tag} BAD unknown command {cmd}")
        finally:
            writer.close()
