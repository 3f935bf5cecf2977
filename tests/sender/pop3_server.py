"""A small POP3 server (RFC 1939) on asyncio for the bounce mailbox tests: a test peer, not
product code. USER/PASS, STAT, LIST, UIDL, RETR (dot-stuffed), DELE, RSET, NOOP, QUIT; deletions
take effect only at QUIT (a dropped session deletes nothing), and the maildrop is locked per
session, as real servers do. ``drop_after_retr`` makes the server cut the connection after that
many RETRs of a session (a mailbox failing mid-poll)."""

from __future__ import annotations

import asyncio

from .mailbox_server import MailboxServer


class Pop3Server(MailboxServer):
    greeting = "+OK test POP3 server ready"

    def __init__(self, user: str = "bounces", password: str = "secret"):
        super().__init__(user, password)
        self.locked = False

    def uid(self, n: int) -> str:
        return f"uid{n:05d}"

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(line: str) -> None:
            self.reply(writer, line)

        user_ok = authed = False
        snapshot: list[tuple[str, bytes]] = []
        deleted: set[int] = set()
        retrs = 0
        try:
            # None: dropped, nothing deleted
            while (text := await self.command(reader, writer)) is not None:
                parts = text.strip().split()
                if not parts:
                    send("-ERR empty command")
                    continue
                cmd, args = parts[0].upper(), parts[1:]
                if cmd == "CAPA":
                    writer.write(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")
                elif cmd == "USER":
                    user_ok = args == [self.user]
                    send("+OK" if user_ok else "-ERR unknown user")
                elif cmd == "PASS":
                    if not user_ok or args != [self.password]:
                        send("-ERR authentication failed")
                    elif self.locked:
                        send("-ERR [IN-USE] maildrop locked by another session")
                    else:
                        self.locked = authed = True
                        snapshot = list(self.maildrop.items())
                        send(f"+OK {len(snapshot)} messages")
                elif cmd == "QUIT":
                    if authed:
                        for i in deleted:
                            self.maildrop.pop(snapshot[i][0], None)
                        self.quits += 1
                    send("+OK bye")
                    await writer.drain()
                    return
                elif not authed:
                    send("-ERR log in first")
                elif cmd == "STAT":
                    live = [m for i, (_u, m) in enumerate(snapshot) if i not in deleted]
                    send(f"+OK {len(live)} {sum(len(m) for m in live)}")
                elif cmd in ("LIST", "UIDL"):
                    rows = [(i + 1, u, m) for i, (u, m) in enumerate(snapshot) if i not in deleted]
                    send("+OK")
                    for n, u, m in rows:
                        send(f"{n} {u if cmd == 'UIDL' else len(m)}")
                    send(".")
                elif cmd in ("RETR", "DELE"):
                    try:
                        i = int(args[0]) - 1
                        if not 0 <= i < len(snapshot) or i in deleted:
                            raise ValueError
                    except (IndexError, ValueError):
                        send("-ERR no such message")
                        continue
                    if cmd == "DELE":
                        deleted.add(i)
                        send("+OK deleted")
                        continue
                    if self.drop_after_retr is not None and retrs >= self.drop_after_retr:
                        writer.close()
                        return
                    retrs += 1
                    uid, raw = snapshot[i]
                    self.retrieved.append(uid)
                    send(f"+OK {len(raw)} octets")
                    for ln in raw.replace(b"\r\n", b"\n").split(b"\n"):
                        writer.write((b"." + ln if ln.startswith(b".") else ln) + b"\r\n")
                    send(".")
                elif cmd == "RSET":
                    deleted.clear()
                    send("+OK")
                elif cmd == "NOOP":
                    send("+OK")
                else:
                    send("-ERR unknown command")
        finally:
            if authed:
                self.locked = False
