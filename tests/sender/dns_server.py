"""A tiny authoritative DNS server for tests: answers TXT queries from a dict, over UDP,
with dnspython's message parsing. Everything else is NXDOMAIN."""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class TxtServer:
    def __init__(self, records: dict[str, list[str]]):
        self.records = {k.rstrip(".").lower(): v for k, v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                q = dns.message.from_wire(data)
            except Exception:
                continue
            resp = dns.message.make_response(q)
            resp.flags |= dns.flags.AA
            question = q.question[0]
            name = question.name.to_text().rstrip(".").lower()
            self.queries.append(name)
            texts = self.records.get(name)
            if texts is None:
                resp.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT:
                chunks = []
                for t in texts:
                    parts = [t[i:i + 255] for i in range(0, len(t), 255)] or [""]
                    chunks.append(" ".join('"' + p.replace('"', '\\"') + '"' for p in parts))
                resp.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "TXT", chunks))
            self.sock.sendto(resp.to_wire(), addr)

