"""Scrape cost of the exporter's /metrics: empty database vs 2,000,000 leads + 10,000,000 messages.

Targets (issue 4): median scrape <= 50 ms at both sizes, and large / empty <= 1.5.

What it does, in dedicated databases it creates and drops (``mailgenius_bench_*``) and a dedicated
Redis prefix:

1. loads the large database: 2,000,000 leads (set-based INSERT ... SELECT generate_series, with
   the lead-count triggers active, as in production) and 50 campaigns with 10,000,000 messages
   (set-based, 1,000,000-row statements; foreign-key checks are skipped for the messages load only,
   with ``session_replication_role = replica``: the ids are consistent by construction and the
   check is not what is measured), ANALYZE, then waits for autovacuum to finish;
2. starts two real exporters (``mailgenius serve exporter``), one on an empty migrated database,
   one on the large one, and waits until each shows a snapshot of its data;
3. scrapes them in alternation over keep-alive connections (after a warm-up), so that whatever
   else runs on the shared machine slows both sides alike: the empty exporter is the baseline
   run in the same process, and the ratio compares like with like.

It prints both medians (and p95), the ratio, the body sizes, the background refresh time of each
collector on both databases (``mailgenius_exporter_collect_duration_seconds``: the background work
does not scan the big tables either), and the load times.

    .venv/bin/python benchmarks/exporter_scrape.py [--scrapes 500] [--keep | --database NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.procs import free_port  # noqa: E402
from mailgenius.db import migrate, with_database  # noqa: E402
from mailgenius.settings import load_settings  # noqa: E402

LEADS = 2_000_000
MESSAGES = 10_000_000
CAMPAIGNS = 50
CHUNK = 1_000_000
TARGET_MS = 50.0
TARGET_RATIO = 1.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    return body


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def refresh_durations(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) * 1000 for m in re.finditer(
        r'^mailgenius_exporter_collect_duration_seconds\{collector="([^"]+)"\} (\S+)$', text, re.M)}


def wait_snapshot(port: int, expect_leads: int, timeout: float = 120) -> str:
    """Until /metrics shows the expected total of leads (a snapshot taken after the load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = metrics_text(port)
            total = sum(float(v) for v in re.findall(r'^mailgenius_leads\{status="[a-z]+"\} (\S+)$', text, re.M))
            if total == expect_leads and sample(text, "mailgenius_exporter_collector_up", '{collector="leads"}') == 1:
                return text
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the exporter did not show {expect_leads} leads within {timeout}s")


def summarise(label: str, times: list[float]) -> tuple[float, float]:
    med = statistics.median(times)
    p95 = statistics.quantiles(times, n=20)[18]
    log(f"{label}: median {med:.2f} ms, p95 {p95:.2f} ms, min {min(times):.2f} ms over {len(times)} scrapes")
    return med, p95


async def load(dsn: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn, command_timeout=3600)
    took = {}
    try:
        t0 = time.perf_counter()
        for start in range(0, LEADS, CHUNK):
            await conn.execute(
                """INSERT INTO leads (email, first_name, tags, status, source, created_at)
                   SELECT 'lead' || g || '@example.com', 'Name' || g, ARRAY['bench', 't' || (g % 10)],
                          (ARRAY['active','active','active','active','active','active','active',
                                 'unsubscribed','bounced','complained'])[1 + g % 10],
                          'benchmark', now() - (g % 86400) * interval '1 second'
                   FROM generate_series($1::bigint, $2::bigint) g""",
                start + 1, min(start + CHUNK, LEADS))
            log(f"  leads: {min(start + CHUNK, LEADS):,}")
        took["leads_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        per = MESSAGES // CAMPAIGNS
        await conn.execute(
            f"""INSERT INTO campaigns (name, subject, from_email, status, recipients, queued, sent,
                                       delivered, bounced, opened, clicked, created_at)
                SELECT 'bench ' || c, 'subject', 'news@example.com',
                       CASE WHEN c > {CAMPAIGNS - 3} THEN 'sending' ELSE 'sent' END,
                       {per}, {per}, {per}, {per * 97 // 100}, {per * 2 // 100}, {per // 4}, {per // 30},
                       now() - ({CAMPAIGNS} - c) * interval '1 day'
                FROM generate_series(1, {CAMPAIGNS}) c""")
        await conn.execute("SET session_replication_role = replica")  # skip FK triggers for this load only
        for start in range(0, MESSAGES, CHUNK):
            await conn.execute(
                f"""INSERT INTO messages (campaign_id, lead_id, email, batch, status, delivery, provider,
                                          attempts, created_at, sent_at)
                    SELECT (g - 1) / {per} + 1, (g - 1) % {LEADS} + 1, 'lead' || ((g - 1) % {LEADS} + 1) || '@example.com',
                           ((g - 1) % {per}) / 1000,
                           CASE WHEN g % 100 = 0 THEN 'failed' ELSE 'sent' END,
                           CASE WHEN g % 50 = 0 THEN 'bounced' ELSE 'delivered' END, 'smtp', 1,
                           now() - interval '2 days', now() - interval '2 days'
                    FROM generate_series($1::bigint, $2::bigint) g""",
                start + 1, min(start + CHUNK, MESSAGES))
            log(f"  messages: {min(start + CHUNK, MESSAGES):,}")
        await conn.execute("SET session_replication_role = DEFAULT")
        took["messages_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await conn.execute("ANALYZE")
        took["analyze_s"] = time.perf_counter() - t0
        took["leads"] = await conn.fetchval("SELECT count(*) FROM leads")
        took["messages"] = await conn.fetchval("SELECT count(*) FROM messages")
    finally:
        await conn.close()
    return took


async def wait_quiet(dsn: str, timeout: float = 180.0) -> float:
    """Wait until no autovacuum / autoanalyze works on the freshly loaded tables (it would steal
    the CPU from one side of the comparison); returns the seconds waited."""
    t0 = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CHECKPOINT")
        while time.monotonic() - t0 < timeout:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
            if not busy:
                break
            await asyncio.sleep(1)
    finally:
        await conn.close()
    return time.monotonic() - t0


def interleaved(port_a: int, port_b: int, n: int, warmup: int = 30) -> tuple[list[float], list[float]]:
    """Scrape both exporters in alternation (A B, B A, ...): whatever else loads the machine
    hits both sides alike, so their ratio stays meaningful on a shared 2-core box."""
    ca = http.client.HTTPConnection("127.0.0.1", port_a, timeout=10)
    cb = http.client.HTTPConnection("127.0.0.1", port_b, timeout=10)
    ta: list[float] = []
    tb: list[float] = []

    def one(conn) -> float:
        t0 = time.perf_counter()
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        dt = (time.perf_counter() - t0) * 1000
        if resp.status != 200 or b"mailgenius_leads" not in body:
            raise RuntimeError(f"bad scrape: HTTP {resp.status}: {body[:300]!r}")
        return dt

    for i in range(warmup + n):
        pair = [(ca, ta), (cb, tb)] if i % 2 == 0 else [(cb, tb), (ca, ta)]
        for conn, out in pair:
            dt = one(conn)
            if i >= warmup:
                out.append(dt)
    ca.close()
    cb.close()
    return ta, tb


def start_exporter(base, dsn: str, prefix: str, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGENIUS_")}
    env.update({
        "DATABASE_URL": dsn, "REDIS_URL": base.redis_url, "BROKER_URL": base.redis_url,
        "MAILGENIUS_REDIS_PREFIX": prefix, "MAILGENIUS_EXPORTER_PORT": str(port),
        "MAILGENIUS_LOG_LEVEL": "warning", "MAILGENIUS_DATA_DIR": f"/tmp/{prefix}",
        # refresh every second (default 5 s) so the refresh times printed are steady-state ones
        "MAILGENIUS_EXPORTER_REFRESH_SECONDS": "1",
    })
    return subprocess.Popen([str(ROOT / ".venv" / "bin" / "mailgenius"), "serve", "exporter"], env=env,
                            cwd=str(ROOT), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(f"/tmp/{prefix}-{port}-exporter.log", "wb"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scrapes", type=int, default=500, help="timed scrapes per size (after 30 warm-up)")
    ap.add_argument("--keep", action="store_true", help="keep the large database (pass it to --database next time)")
    ap.add_argument("--database", default="", help="reuse a large database kept by an earlier --keep run")
    args = ap.parse_args()

    base = load_settings()
    tag = uuid.uuid4().hex[:8]
    empty_name = f"mailgenius_bench_empty_{tag}"
    large_name = args.database or f"mailgenius_bench_{tag}"
    admin_dsn = with_database(base.database_url, "postgres")
    empty_dsn, large_dsn = with_database(base.database_url, empty_name), with_database(base.database_url, large_name)
    prefix = f"mgbench-{tag}"

    async def create(name, dsn):
        c = await asyncpg.connect(admin_dsn)
        await c.execute(f'CREATE DATABASE "{name}"')
        await c.close()
        await migrate(dsn)

    async def drop(name):
        c = await asyncpg.connect(admin_dsn)
        await c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        await c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await c.close()

    procs: list[subprocess.Popen] = []
    try:
        asyncio.run(create(empty_name, empty_dsn))
        if not args.database:
            asyncio.run(create(large_name, large_dsn))
            log(f"loading {LEADS:,} leads and {MESSAGES:,} messages (set-based) into {large_name} ...")
            took = asyncio.run(load(large_dsn))
            log(f"loaded {took['leads']:,} leads in {took['leads_s']:.1f} s, {took['messages']:,} messages in "
                f"{took['messages_s']:.1f} s, ANALYZE {took['analyze_s']:.1f} s")
        waited = asyncio.run(wait_quiet(large_dsn))
        log(f"autovacuum quiet after {waited:.0f} s")

        async def count():
            c = await asyncpg.connect(large_dsn)
            try:
                return await c.fetchval("SELECT count(*) FROM leads"), await c.fetchval("SELECT count(*) FROM messages")
            finally:
                await c.close()

        n_leads, n_messages = asyncio.run(count())
        port_e, port_l = free_port(), free_port()
        procs.append(start_exporter(base, empty_dsn, prefix + "-e", port_e))
        procs.append(start_exporter(base, large_dsn, prefix + "-l", port_l))
        text_e = wait_snapshot(port_e, 0, timeout=60)
        text_l = wait_snapshot(port_l, n_leads, timeout=60)
        log(f"exporters up (empty :{port_e}, large :{port_l}); load average {os.getloadavg()}")
        empty, large = interleaved(port_e, port_l, args.scrapes)
        med0, p950 = summarise("empty database", empty)
        med1, p951 = summarise(f"{n_leads:,} leads + {n_messages:,} messages", large)
        time.sleep(2.5)  # at least two more refreshes: pool connections are warm
        ref_l = refresh_durations(metrics_text(port_l))
        ref_e = refresh_durations(metrics_text(port_e))

        ratio = med1 / med0
        print()
        print("=== exporter /metrics scrape (two exporters, scraped in alternation) ===")
        print(f"median empty        : {med0:8.2f} ms   (p95 {p950:.2f} ms)   target <= {TARGET_MS:g} ms")
        print(f"median 2M/10M       : {med1:8.2f} ms   (p95 {p951:.2f} ms)   target <= {TARGET_MS:g} ms")
        print(f"ratio large / empty : {ratio:8.2f}      target <= {TARGET_RATIO:g}")
        print(f"body size           : {len(text_e):,} bytes empty, {len(text_l):,} bytes large")
        print("background refresh per collector (ms, empty -> large; off the scrape path):")
        for k in sorted(ref_l):
            print(f"  {k:18s} {ref_e.get(k, float('nan')):8.2f} -> {ref_l[k]:8.2f}")
        print(f"load average        : {os.getloadavg()}")
        ok = med0 <= TARGET_MS and med1 <= TARGET_MS and ratio <= TARGET_RATIO
        print("RESULT:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        client = redis.Redis.from_url(base.redis_url)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()
        asyncio.run(drop(empty_name))
        if args.keep:
            print(f"kept database {large_name} (rerun with --database {large_name})")
        else:
            asyncio.run(drop(large_name))


if __name__ == "__main__":
    sys.exit(main())
