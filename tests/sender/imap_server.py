"""A small IMAP4rev1 server (RFC 3501 subset) on asyncio for the bounce mailbox tests: a test
peer, not product code. CAPABILITY, LOGIN, SELECT, UID SEARCH, UID FETCH (BODY.PEEK[] / RFC822),
UID STORE +FLAGS (\\Deleted), EXPUNGE, CLOSE, NOOP, LOGOUT. Flags are stored at once (as real
servers do) and messages leave only at EXPUNGE / CLOSE. Same interface as :class:`Pop3Server`
(``maildrop``, ``deliver``, ``quits``, ``drop_after_retr``) so the tests run on both."""

from __future__ import annotations

import asyncio
import re

from .mailbox_server import MailboxServer


class ImapServer(MailboxServer):
    greeting = "* OK IMAP4rev1 test server ready"

    def __init__(self, user: str = "bounces", password: str = "secret"):
        super().__init__(user, password)
        self.flags: dict[str, set[str]] = {}

    def deliver(self, raw: bytes) -> str:
        uid = super().deliver(raw)
        self.flags[uid] = set()
        return uid

    def _expunge(self) -> list[int]:
        gone = []
        for seq, uid in enumerate(list(self.maildrop), start=1):
            if "\\Deleted" in self.flags.get(uid, set()):
                gone.append(seq - len(gone))
                del self.maildrop[uid]
                self.flags.pop(uid, None)
        return gone

    async def converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(line: str | bytes) -> None:
            self.reply(writer, line)

        authed = selected = False
        fetches = 0
        while (text := await self.command(reader, writer)) is not None:
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
