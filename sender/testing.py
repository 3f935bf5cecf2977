"""Local stand-ins for the providers, for tests and benchmarks: a fake of Resend's batch endpoint
(benchmarks/send_campaign.py) and a scripted SMTP relay (:class:`TestRelay`, aiosmtpd).

It behaves like the parts of Resend we rely on: ``POST /emails/batch`` (<= 100 emails, Bearer
key, ``Idempotency-Key`` replayed for 24 h: a repeated key returns the first answer and sends
nothing again; ``x-batch-validation: permissive`` per-email errors), ``POST /emails``. It counts
every recipient it accepted, so a test can prove each was sent exactly once.

Control endpoints: ``GET /_stats``, ``POST /_script`` (``{"responses": [{"status": 429,
"retry_after": "1"}, {"status": 500}]}``: answers for the next calls), ``POST /_config``
(``{"delay": seconds}``), ``POST /_reset``. Addresses whose local part starts with ``reject``
are refused (a per-email 4xx).

Run standalone: ``python -m sender.testing --port 8650``.

:class:`TestRelay` is a real aiosmtpd relay that counts deliveries per recipient and the
connections open to it (now and at peak), with SMTPUTF8 on or off, and refuses by the recipient's
local part (see :data:`RELAY_RULES`): ``unknown*`` 550 5.1.1 at RCPT, ``policy*`` 550 5.7.1 at RCPT,
``full*`` 552 at DATA, ``grey*`` 451 at RCPT (the first ``grey_times`` attempts), ``busy*`` 421 at
RCPT (first attempt, then the relay closes the connection), ``drop*`` the connection dropped after
the body, before the reply (first attempt: nothing delivered).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import Counter

import orjson
from aiohttp import web

MAX_BATCH = 100


def _provider_id() -> str:
    """A random UUID-shaped id like Resend's (random, so the ledger's provider-id index sees
    realistic keys), without uuid.uuid4()'s cost: the benchmark's stand-in should cost what an
    endpoint costs."""
    h = f"{random.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class FakeResend:
    def __init__(self, *, api_key: str | None = None, delay: float = 0.0):
        self.api_key = api_key
        self.delay = delay
        self.script: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.calls = 0
        self.replays = 0
        self.emails = 0
        self.in_flight = 0
        self.keys: dict[str, tuple[int, bytes]] = {}
        self.pending_keys: set[str] = set()
        self.call_log: list[tuple[float, int, int]] = []  # (time, emails accepted, status)
        self.last_payload: list[dict] = []
        self.last_headers: dict[str, str] = {}

    def stats(self) -> dict:
        dup = sum(n - 1 for n in self.counts.values() if n > 1)
        accepted = [t for t, n, _s in self.call_log if n]
        return {"calls": self.calls, "replays": self.replays, "emails": self.emails,
                "unique_recipients": len(self.counts), "duplicates": dup, "in_flight": self.in_flight,
                "first_at": accepted[0] if accepted else None, "last_at": accepted[-1] if accepted else None,
                "statuses": dict(Counter(s for _t, _n, s in self.call_log))}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/emails/batch", self.batch)
        app.router.add_post("/emails", self.single)
        app.router.add_get("/", self.index)
        app.router.add_get("/_stats", self.get_stats)
        app.router.add_post("/_script", self.set_script)
        app.router.add_post("/_config", self.set_config)
        app.router.add_post("/_reset", self.do_reset)
        return app

    async def index(self, request):
        return web.json_response({"name": "fake-resend"})

    async def get_stats(self, request):
        return web.json_response(self.stats())

    async def set_script(self, request):
        self.script.extend((await request.json()).get("responses", []))
        return web.json_response({"queued": len(self.script)})

    async def set_config(self, request):
        body = await request.json()
        if "delay" in body:
            self.delay = float(body["delay"])
        return web.json_response({"delay": self.delay})

    async def do_reset(self, request):
        self.reset()
        self.script.clear()
        return web.json_response({"ok": True})

    def _error(self, status: int, message: str, headers=None):
        return web.json_response({"statusCode": status, "name": "error", "message": message},
                                 status=status, headers=headers)

    async def single(self, request):
        return await self._handle(request, single=True)

    async def batch(self, request):
        return await self._handle(request, single=False)

    async def _handle(self, request, *, single: bool):
        self.calls += 1
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or (self.api_key is not None and auth[7:] != self.api_key):
            self.call_log.append((time.time(), 0, 401))
            return self._error(401, "API key is invalid")
        if self.script:
            forced = self.script.pop(0)
            status = int(forced.get("status", 500))
            headers = {"Retry-After": str(forced["retry_after"])} if "retry_after" in forced else None
            self.call_log.append((time.time(), 0, status))
            return self._error(status, forced.get("message", f"forced {status}"), headers)
        key = request.headers.get("Idempotency-Key")
        if key and key in self.keys:
            self.replays += 1
            status, body = self.keys[key]
            self.call_log.append((time.time(), 0, status))
            return web.Response(body=body, status=status, content_type="application/json")
        if key and key in self.pending_keys:
            return self._error(409, "concurrent_idempotent_requests")
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(422, "invalid JSON")
        emails = [payload] if single else payload
        if not isinstance(emails, list) or not emails or len(emails) > MAX_BATCH:
            return self._error(422, f"a batch holds 1 to {MAX_BATCH} emails")
        if key:
            self.pending_keys.add(key)
        self.in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            data, errors = [], []
            counts = self.counts
            for i, e in enumerate(emails):
                to = e.get("to") if isinstance(e, dict) else None
                to = to[0] if isinstance(to, list) and to else to
                if not isinstance(to, str) or "@" not in to or not e.get("from") or not e.get("subject"):
                    errors.append({"index": i, "message": "The `to`, `from` and `subject` fields are required."})
                    continue
                if to.split("@")[0].lower().startswith("reject"):
                    errors.append({"index": i, "message": f"Invalid `to` field: {to} is not deliverable."})
                    continue
                counts[to.lower()] += 1
                data.append({"id": _provider_id()})
            self.emails += len(data)
            self.last_payload = emails
            self.last_headers = dict(request.headers)
            if single:
                body = orjson.dumps(data[0] if data else {"message": errors[0]["message"]})
                status = 200 if data else 422
            else:
                body = orjson.dumps({"data": data, "errors": errors} if errors else {"data": data})
                status = 200
            if key and status == 200:
                self.keys[key] = (status, body)
            self.call_log.append((time.time(), len(data), status))
            return web.Response(body=body, status=status, content_type="application/json")
        finally:
            self.in_flight -= 1
            if key:
                self.pending_keys.discard(key)


#: local-part prefix -> (stage, reply, attempts it applies to: None = always, n = the first n)
RELAY_RULES: dict[str, tuple[str, str, int | None]] = {
    "unknown": ("RCPT", "550 5.1.1 <{addr}>: Recipient address rejected: User unknown", None),
    "policy": ("RCPT", "550 5.7.1 Message rejected under policy", None),
    "full": ("DATA", "552 5.3.4 Message size exceeds fixed limit", None),
    "grey": ("RCPT", "451 4.7.1 Greylisted, please try again later", 1),
    "busy": ("RCPT", "421 4.7.0 Too many connections, closing", 1),
    "drop": ("DATA", "DROP", 1),
}


class _RelayHandler:
    def __init__(self, relay: TestRelay):
        self.relay = relay

    def _rule(self, address: str, stage: str) -> str | None:
        local = address.split("@", 1)[0].lower()
        for prefix, (st, reply, times) in self.relay.rules.items():
            if st == stage and local.startswith(prefix):
                n = self.relay.attempts[(stage, address.lower())]
                if times is None or n <= times:
                    return reply.format(addr=address)
        return None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.relay.lock:
            self.relay.attempts[("RCPT", address.lower())] += 1
            reply = self._rule(address, "RCPT")
        if reply is not None:
            if reply.startswith("421"):  # the relay hangs up once the reply is out
                asyncio.get_running_loop().call_later(0.05, server.transport.close)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.relay.lock:
            for rcpt in envelope.rcpt_tos:
                self.relay.attempts[("DATA", rcpt.lower())] += 1
            replies = [(r, self._rule(r, "DATA")) for r in envelope.rcpt_tos]
        for _rcpt, reply in replies:
            if reply == "DROP":
                server.transport.abort()  # mid-conversation: the body was read, no reply is sent
                return "451 dropped"
            if reply is not None:
                return reply
        with self.relay.lock:
            for rcpt in envelope.rcpt_tos:
                self.relay.delivered[rcpt.lower()] += 1
            if self.relay.keep:
                data = envelope.original_content or envelope.content
                self.relay.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                            data.encode() if isinstance(data, str) else data))
        if self.relay.delay:
            await asyncio.sleep(self.relay.delay)
        return "250 2.0.0 Ok: queued"


class TestRelay:
    """A real SMTP relay (aiosmtpd, its own thread) for tests: see the module docstring."""

    __test__ = False  # not a pytest class

    def __init__(self, *, smtputf8: bool = True, rules: dict | None = None, keep: bool = False,
                 delay: float = 0.0):
        self.smtputf8 = smtputf8
        self.rules = dict(RELAY_RULES if rules is None else rules)
        self.keep = keep
        self.delay = delay
        self.lock = threading.Lock()
        self.delivered: Counter = Counter()
        self.attempts: Counter = Counter()
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.open = 0
        self.peak = 0
        self.connections = 0
        self.controller = None
        self.port = 0

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.delivered.values() if n > 1)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> TestRelay:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        relay = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport):
                with relay.lock:
                    relay.open += 1
                    relay.connections += 1
                    relay.peak = max(relay.peak, relay.open)
                super().connection_made(transport)

            def connection_lost(self, error):
                with relay.lock:
                    relay.open -= 1
                super().connection_lost(error)

        class RelayController(Controller):
            def factory(self):
                return CountingSMTP(self.handler, **self.SMTP_kwargs)

        if not port:
            import socket

            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.port = port
        self.controller = RelayController(_RelayHandler(self), hostname=host, port=port, ready_timeout=10,
                                         enable_SMTPUTF8=self.smtputf8, data_size_limit=50 * 1024 * 1024)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> TestRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def start_fake(host: str = "127.0.0.1", port: int = 0, **kw) -> tuple[FakeResend, web.AppRunner, str]:
    fake = FakeResend(**kw)
    runner = web.AppRunner(fake.app(), access_log=None, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sock = site._server.sockets[0]  # the bound port when port=0
    return fake, runner, f"http://{host}:{sock.getsockname()[1]}"


class _SinkProtocol(asyncio.Protocol):
    """One connection of :class:`FastSink`: a minimal ESMTP server (PIPELINING, SMTPUTF8,
    8BITMIME) that accepts everything; commands are parsed from the buffer as they come, so a
    pipelining client is answered in one write."""

    def __init__(self, sink: FastSink):
        self.sink = sink
        self.buf = b""
        self.in_data = False
        self.rcpts = 0

    def connection_made(self, transport):
        self.transport = transport
        self.sink.open += 1
        self.sink.connections += 1
        self.sink.peak = max(self.sink.peak, self.sink.open)
        transport.write(b"220 fast-sink ESMTP\r\n")

    def connection_lost(self, exc):
        self.sink.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    if len(self.buf) > 64 << 20:
                        self.transport.close()
                    break
                self.buf = self.buf[end + 5:]
                self.in_data = False
                self.sink.messages += 1
                self.sink.recipients += self.rcpts
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2:]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                out.append(b"250-fast-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                           b"250 SIZE 52428800\r\n" if verb == b"EHLO" else b"250 fast-sink\r\n")
            elif verb == b"MAIL":
                self.rcpts = 0
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            elif verb == b"XSTA":  # XSTATS: the counters, for the benchmark
                s = self.sink
                out.append(f"250 messages={s.messages} recipients={s.recipients} peak={s.peak} "
                           f"open={s.open} connections={s.connections}\r\n".encode())
            elif verb == b"XRES":  # XRESET: zero the counters (peak: the connections open now)
                s = self.sink
                s.messages = s.recipients = s.connections = 0
                s.peak = s.open
                out.append(b"250 reset\r\n")
            else:  # RSET, NOOP, ...
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


class FastSink:
    """An SMTP sink that costs the client as little as possible (benchmarks/send_smtp.py): one
    asyncio protocol, no handler per command, counts messages, recipients and connections (open
    now, at peak). Ask for the counters with the ``XSTATS`` command, zero them with ``XRESET``."""

    def __init__(self):
        self.messages = self.recipients = self.open = self.peak = self.connections = 0

    async def serve(self, host: str, port: int):
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _SinkProtocol(self), host, port, backlog=1024)


async def sink_stats(host: str, port: int) -> dict[str, int]:
    """The counters of a running :class:`FastSink` (one short connection of its own, not counted
    in ``peak`` beyond itself)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"XSTATS\r\n")
        line = (await reader.readline()).decode()
        writer.write(b"QUIT\r\n")
        return {k: int(v) for k, v in (kv.split("=") for kv in line[4:].split())}
    finally:
        writer.close()


async def sink_reset(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"XRESET\r\nQUIT\r\n")
        await reader.readline()
    finally:
        writer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fake Resend batch endpoint, or (--smtp-sink) a fast SMTP sink "
                                            "(tests, benchmarks)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=8650, help="listen port; pick a free one")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each call takes (provider latency)")
    p.add_argument("--smtp-sink", action="store_true", help="serve the fast SMTP sink instead (FastSink)")
    args = p.parse_args(argv)
    if args.smtp_sink:
        async def serve():
            server = await FastSink().serve(args.host, args.port)
            async with server:
                await server.serve_forever()

        try:
            asyncio.run(serve())
        except KeyboardInterrupt:
            pass
        return 0
    fake = FakeResend(delay=args.delay)
    web.run_app(fake.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
