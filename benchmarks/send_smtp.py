"""SMTP send benchmark: the real sender (API -> ledger -> dramatiq -> worker -> SMTP pool) against a
local SMTP sink, side by side with a bare aiosmtplib loop to the same sink.

Prints, for each: emails/s (sustained, first -> last message the sink received) and the peak
number of connections open to the sink at once; for the real path also the CPU per email of the
workers, the sink and Postgres, and the machine's load average (other work shares the cores).

    flock /tmp/mg-bench.lock .venv/bin/python benchmarks/send_smtp.py                  # 50,000 leads
    flock /tmp/mg-bench.lock .venv/bin/python benchmarks/send_smtp.py --leads 200000 --workers 2 --pool 16

The sink is sender.testing.FastSink (a minimal asyncio ESMTP server in its own process, so its
cost is not the client's; aiosmtpd would be the bottleneck itself). Uses a throw-away database next to DATABASE_URL's and its own Redis prefix; starts
the sink, the sender API and `mailgenius worker sender` on free ports and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import aiosmtplib
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.procs import (  # noqa: E402
    cancel_on_signals,
    cpu_seconds,
    create_scratch_database,
    drop_database,
    free_port,
    start,
    stop,
    tree_cpu_seconds,
    wait_http,
)
from mailgenius import auth  # noqa: E402
from mailgenius.db import migrate  # noqa: E402
from mailgenius.settings import load_settings  # noqa: E402
from sender.providers import OutEmail, mime_bytes  # noqa: E402
from sender.testing import sink_reset, sink_stats  # noqa: E402

#: the issue's target: emails/s over SMTP with at most MAX_CONNECTIONS open to the relay
TARGET = 2500
MAX_CONNECTIONS = 32


async def pg_cpu(pool, db_name: str) -> float:
    pids = [r["pid"] for r in await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", db_name)]
    return sum(cpu_seconds(p) for p in pids)


async def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Sampler:
    """Polls the sink's counters: first/last time the message count moved, peak connections."""

    def __init__(self, port: int):
        self.port = port
        self.first = self.last = None
        self.count = 0
        self.peak = 0

    async def stats(self) -> dict:
        return await sink_stats("127.0.0.1", self.port)

    async def run(self, until: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = await self.stats()
            now = time.perf_counter()
            # the sampler's own connection is counted by the sink: leave it out
            self.peak = max(self.peak, st["peak"] - 1)
            if st["messages"] > self.count:
                if self.first is None:
                    self.first = now
                self.last = now
                self.count = st["messages"]
            if self.count >= until:
                return
            await asyncio.sleep(0.1)

    def rate(self) -> float:
        return self.count / max(1e-9, (self.last or 0) - (self.first or 0)) if self.first else 0.0


def sample_email(i: int) -> OutEmail:
    html = (f"<html><body><h1>Hi First{i} Last{i}</h1><p>Our bench offer for Company {i % 1000}.</p>"
            "<a href=\"https://mail.example.test/t/c/abcdefabcdef\">Shop now</a><p><a href=\"https://mail.example."
            "test/u/abcdef\">Unsubscribe</a></p><img src=\"https://mail.example.test/t/o/abcdef\"></body></html>")
    return OutEmail(i, f"lead{i}@bench.example.com", "Bench <bench@example.com>",
                    f"Hello First{i}, news from Company {i % 1000}", html,
                    f"Hi First{i}, our offer for Company {i % 1000}: https://shop.example.com/sale",
                    {"List-Unsubscribe": "<https://mail.example.test/u/abcdef>",
                     "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})


async def bare_loop(port: int, n: int, connections: int) -> tuple[float, int]:
    """The floor: ``connections`` aiosmtplib clients sending prebuilt messages as fast as they can
    (MAIL, RCPT, DATA per message, like the sender; message bytes built beforehand)."""
    await sink_reset("127.0.0.1", port)
    bodies = [mime_bytes(sample_email(i), utf8=False) for i in range(min(n, 2000))]
    counter = iter(range(n))

    async def one():
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        await client.ehlo()
        for i in counter:
            await client.mail("bench@example.com")
            await client.rcpt(f"lead{i}@bench.example.com")
            await client.data(bodies[i % len(bodies)])
        await client.quit()

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - t
    st = await sink_stats("127.0.0.1", port)
    return n / elapsed, st["peak"] - 1


async def run(args) -> int:
    cancel_on_signals()
    base = load_settings()
    db_name, admin_url, db_url = await create_scratch_database(base.database_url)
    prefix = f"mgbench-{uuid.uuid4().hex[:6]}"
    logdir = ROOT / "var" / "bench"
    logdir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    pool = None
    try:
        await migrate(db_url)
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
        await pool.execute(
            """INSERT INTO leads (email, first_name, last_name, company, tags)
               SELECT 'lead' || g || '@bench.example.com', 'First' || g, 'Last' || g, 'Company ' || (g % 1000),
                      ARRAY['all'] FROM generate_series(1, $1) g""", args.leads)
        await pool.execute("ANALYZE leads")
        async with pool.acquire() as c:
            _id, key = await auth.create_key(c, ["send", "admin", "read"], "bench")
        hdr = {"Authorization": f"Bearer {key}"}
        py, mg = str(ROOT / ".venv/bin/python"), str(ROOT / ".venv/bin/mailgenius")
        sink_port, api_port = free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": db_url, "REDIS_URL": base.redis_url, "BROKER_URL": base.redis_url,
            "MAILGENIUS_REDIS_PREFIX": prefix, "MAILGENIUS_EMAIL_PROVIDER": "smtp",
            "MAILGENIUS_SMTP_HOST": "127.0.0.1", "MAILGENIUS_SMTP_PORT": str(sink_port),
            "MAILGENIUS_SENDER_SMTP_POOL_SIZE": str(args.pool),
            "MAILGENIUS_TRACKING_SECRET": "bench-secret-not-for-production", "MAILGENIUS_LOG_LEVEL": "warning",
            "MAILGENIUS_DATA_DIR": str(logdir / prefix), "MAILGENIUS_DB_POOL_MAX": str(args.threads + 4),
        })
        sink_cmd = [py, "-m", "sender.testing", "--smtp-sink", "--port", str(sink_port)]
        procs["sink"] = start(sink_cmd, env, open(logdir / "smtp-sink.log", "wb"))
        await wait_port(sink_port)
        load0 = os.getloadavg()

        # -- the floor: a bare aiosmtplib loop -------------------------------------------------
        bare_rate, bare_peak = await bare_loop(sink_port, args.bare, MAX_CONNECTIONS)
        print(f"bare aiosmtplib loop: {args.bare:,} emails over {MAX_CONNECTIONS} connections: "
              f"{bare_rate:,.0f} emails/s, peak {bare_peak} connections", flush=True)

        # -- the real sender -------------------------------------------------------------------
        procs["api"] = start([mg, "serve", "sender", "--port", str(api_port)], env, open(logdir / "smtp-api.log", "wb"))
        procs["workers"] = start([mg, "worker", "sender", "--processes", str(args.workers), "--threads",
                                  str(args.threads), "--metrics-port", str(free_port())], env,
                                 open(logdir / "smtp-worker.log", "wb"))
        await wait_http(f"http://127.0.0.1:{api_port}/api/health")
        await asyncio.sleep(3)  # workers boot
        await sink_reset("127.0.0.1", sink_port)
        async with aiohttp.ClientSession(headers=hdr) as s:
            api = f"http://127.0.0.1:{api_port}"
            async with s.put(f"{api}/api/settings/email", json={"provider": "smtp", "rate_limit": 0}) as r:
                assert r.status == 200, await r.text()
            body = {"name": "bench", "subject": "Hello {{ first_name }}, news from {{ company }}",
                    "from_email": "Bench <bench@example.com>",
                    "html": "<html><body><h1>Hi {{ first_name }} {{ last_name }}</h1><p>Our {{ campaign.name }} "
                            "offer for {{ company }}.</p><a href=\"https://shop.example.com/sale\">Shop now</a>"
                            "<p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p></body></html>",
                    "text": "Hi {{ first_name }}, our offer for {{ company }}: https://shop.example.com/sale",
                    "segment": {"tags": ["all"]}}
            async with s.post(f"{api}/api/campaigns", json=body) as r:
                cid = (await r.json())["id"]
            cpu0 = {k: tree_cpu_seconds(p.pid) for k, p in procs.items()}
            pg0 = await pg_cpu(pool, db_name)
            t0 = time.perf_counter()
            async with s.post(f"{api}/api/campaigns/{cid}/send") as r:
                assert r.status == 202, await r.text()
            sampler = Sampler(sink_port)
            await sampler.run(args.leads, timeout=args.timeout)
            t_end = time.perf_counter() - t0
            async with s.get(f"{api}/api/campaigns/{cid}") as r:
                camp = await r.json()
            cpu1 = {k: tree_cpu_seconds(p.pid) for k, p in procs.items()}
            pg1 = await pg_cpu(pool, db_name)
        rate = sampler.rate()
        verdict = "meets" if rate >= TARGET and sampler.peak <= MAX_CONNECTIONS else "misses"
        print(f"real sender ({args.workers} worker processes x {args.threads} threads, SMTP pool {args.pool} per "
              f"process): {sampler.count:,} emails, sustained {rate:,.0f} emails/s, end to end "
              f"{sampler.count / t_end:,.0f} emails/s, peak {sampler.peak} connections; campaign {camp['status']} "
              f"sent={camp['sent']} failed={camp['failed']}", flush=True)
        n = max(1, sampler.count)
        print("CPU per email: " + ", ".join(f"{k} {(cpu1[k] - cpu0[k]) / n * 1e6:.0f} us" for k in cpu1)
              + f", postgres {(pg1 - pg0) / n * 1e6:.0f} us", flush=True)
        print(f"side by side: bare {bare_rate:,.0f} emails/s @ {bare_peak} connections | sender {rate:,.0f} "
              f"emails/s @ {sampler.peak} connections ({rate / max(1, bare_rate):.0%} of bare); target >= "
              f"{TARGET:,}/s with <= {MAX_CONNECTIONS} connections: {verdict}", flush=True)
        print(f"load average: {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} now, on {os.cpu_count()} cores "
              f"shared with other work", flush=True)
        return 0
    finally:
        for p in procs.values():
            stop(p)
        if pool is not None:
            await pool.close()
        await drop_database(admin_url, db_name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--leads", type=int, default=50_000, help="recipients of the campaign")
    p.add_argument("--bare", type=int, default=20_000, help="emails of the bare aiosmtplib loop")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=8, help="concurrent batches per worker process")
    p.add_argument("--pool", type=int, default=16, help="SMTP connections per worker process (MAILGENIUS_SENDER_SMTP_POOL_SIZE)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the campaign")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
