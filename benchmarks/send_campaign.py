"""Send-campaign benchmark: API -> recipient ledger -> dramatiq -> fake Resend batch endpoint.

Prints: the ledger floor (a bare INSERT ... SELECT of every lead into messages) and the time to
write the ledger of N recipients, the sustained send rate with no rate limit (two worker
processes; the fake provider answers at once), the CPU per email of each component (and of the
whole machine, with its biggest CPU users, so other work on it shows), the share of HOT updates
of messages, and the achieved rate with ``rate_limit`` 500 (default) against its target. Also
checks every recipient got one email.

    flock /tmp/mg-bench.lock .venv/bin/python benchmarks/send_campaign.py                 # 200,000 leads
    flock /tmp/mg-bench.lock .venv/bin/python benchmarks/send_campaign.py --leads 2000000 # the 2M flag

Uses a throw-away database next to DATABASE_URL's and its own Redis prefix; starts the fake
Resend, the sender API and `mailgenius worker sender` on free ports, and stops them at the end.
Other engineers share this machine's 2 cores: check `uptime` and rerun when it was busy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import uuid
from pathlib import Path

import aiohttp
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

#: the bare-pipeline ceiling quoted by the issue (batch of 100, sandboxed render, one provider
#: call, two set-based ledger updates) on this 2-core machine, emails/s
BASELINE_EMAILS_PER_SECOND = 35_000


async def cpu_snapshot(pool, db_name: str, procs: dict) -> dict[str, float]:
    """CPU seconds used so far by each component (workers, fake provider, API, Postgres backends)."""
    snap = {name: tree_cpu_seconds(proc.pid) for name, proc in procs.items()}
    pids = [r["pid"] for r in await pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", db_name)]
    snap["postgres"] = sum(cpu_seconds(p) for p in pids)
    return snap


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat), every process counted."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])  # guest time is already inside user/nice
    return (total - idle) / hz, total / hz


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (short command line, CPU seconds) of every process on the machine."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            name = " ".join(Path(a.decode(errors="replace")).name if i == 0 else a.decode(errors="replace")
                            for i, a in enumerate(argv[:3]) if a)[:60]
        except OSError:
            continue
        # one group per Postgres database / background process, not per client port
        name = re.sub(r" \S+\(\d+\).*", " (backends)", name)
        out[int(entry)] = (name or "?", cpu_seconds(int(entry)))
    return out


def top_consumers(before: dict, after: dict, emails: int, n: int = 8) -> str:
    """The n biggest CPU users between two process_cpu() snapshots, grouped by command line."""
    groups: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        groups[name] = groups.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {cpu / max(1, emails) * 1e6:.0f} us" for name, cpu in top if cpu > 0)


async def hot_counts(pool) -> tuple[int, int]:
    r = await pool.fetchrow("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'messages'")
    return r["n_tup_upd"], r["n_tup_hot_upd"]


async def floor_insert(pool, n: int) -> float:
    """The floor of the ledger: a bare INSERT ... SELECT of every lead into messages (its indexes,
    no segment filter, no batch numbering, FK triggers skipped as write_ledger does), then emptied."""
    async with pool.acquire() as c:
        cid = await c.fetchval("INSERT INTO campaigns (name, subject, from_email) VALUES ('floor', 's', 'a@b.example') "
                               "RETURNING id")
        t = time.perf_counter()
        async with c.transaction():
            await c.execute("SET LOCAL session_replication_role = replica")
            await c.execute("INSERT INTO messages (campaign_id, lead_id, email, batch) SELECT $1, id, email, 0 FROM leads",
                            cid)
        elapsed = time.perf_counter() - t
        await c.execute("TRUNCATE messages, message_failures, message_provider_ids CASCADE")
        await c.execute("DELETE FROM campaigns WHERE id = $1", cid)
        await c.execute("CHECKPOINT")
    return elapsed


async def run(args) -> int:
    cancel_on_signals()  # the finally block below stops the processes and drops the database
    base = load_settings()
    db_name, admin_url, db_url = await create_scratch_database(base.database_url)
    prefix = f"mgbench-{uuid.uuid4().hex[:6]}"
    logdir = ROOT / "var" / "bench"
    logdir.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        await migrate(db_url)
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
        t = time.perf_counter()
        await pool.execute(
            """INSERT INTO leads (email, first_name, last_name, company, tags)
               SELECT 'lead' || g || '@bench.example.com', 'First' || g, 'Last' || g, 'Company ' || (g % 1000),
                      CASE WHEN g <= $2 THEN ARRAY['all', 'rl'] ELSE ARRAY['all'] END
               FROM generate_series(1, $1) g""", args.leads, args.rate_leads)
        await pool.execute("ANALYZE leads")
        print(f"setup: {args.leads:,} leads inserted in {time.perf_counter() - t:.1f}s", flush=True)
        t_floor = await floor_insert(pool, args.leads)
        print(f"ledger floor: bare INSERT ... SELECT of {args.leads:,} rows into messages in {t_floor:.2f}s", flush=True)
        async with pool.acquire() as c:
            _id, key = await auth.create_key(c, ["send", "admin"], "bench")
        hdr = {"Authorization": f"Bearer {key}"}

        fake_port, api_port = free_port(), free_port()
        fake_url, api_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{api_port}"
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": db_url, "REDIS_URL": base.redis_url, "BROKER_URL": base.redis_url,
            "MAILGENIUS_REDIS_PREFIX": prefix, "MAILGENIUS_EMAIL_PROVIDER": "resend",
            "MAILGENIUS_RESEND_BASE_URL": fake_url, "RESEND_API_KEY": "re_bench",
            "MAILGENIUS_TRACKING_SECRET": "bench-tracking-secret-0123456789", "MAILGENIUS_LOG_LEVEL": "warning",
            "MAILGENIUS_DATA_DIR": str(ROOT / "var" / "bench" / prefix),
            "MAILGENIUS_DB_POOL_MAX": str(args.threads + 4),
        })
        py = str(ROOT / ".venv/bin/python")
        mg = str(ROOT / ".venv/bin/mailgenius")
        named = {
            "fake provider": start([py, "-m", "sender.testing", "--port", str(fake_port)], env, open(logdir / "fake.log", "wb")),
            "sender API": start([mg, "serve", "sender", "--port", str(api_port)], env, open(logdir / "api.log", "wb")),
            "workers": start([mg, "worker", "sender", "--processes", str(args.workers), "--threads", str(args.threads),
                              "--metrics-port", str(free_port())], env, open(logdir / "worker.log", "wb")),
        }
        procs.extend(named.values())
        await wait_http(fake_url + "/_stats")
        await wait_http(api_url + "/api/health")
        await asyncio.sleep(2)  # workers boot

        async with aiohttp.ClientSession(headers=hdr) as s:
            async def campaign_body(tags):
                return {"name": "bench", "subject": "Hello {{ first_name }}, news from {{ company }}",
                        "from_email": "Bench <bench@example.com>",
                        "html": "<html><body><h1>Hi {{ first_name }} {{ last_name }}</h1><p>Our {{ campaign.name }} "
                                "offer for {{ company }}.</p><a href=\"https://shop.example.com/sale\">Shop now</a>"
                                "<p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p></body></html>",
                        "text": "Hi {{ first_name }}, our offer for {{ company }}: https://shop.example.com/sale",
                        "segment": {"tags": tags}}

            async def get(cid):
                async with s.get(f"{api_url}/api/campaigns/{cid}") as r:
                    return await r.json()

            async def fake_stats():
                async with s.get(f"{fake_url}/_stats") as r:
                    return await r.json()

            # -- run 1: no rate limit ------------------------------------------------------
            async with s.put(f"{api_url}/api/settings/email", json={"rate_limit": 0}) as r:
                assert r.status == 200, await r.text()
            async with s.post(f"{api_url}/api/campaigns", json=await campaign_body(["all"])) as r:
                cid = (await r.json())["id"]
            hot0 = await hot_counts(pool)
            cpu0 = await cpu_snapshot(pool, db_name, named)
            t0 = time.time()
            async with s.post(f"{api_url}/api/campaigns/{cid}/send") as r:
                assert r.status == 202, await r.text()
            while (await get(cid))["recipients"] == 0:
                await asyncio.sleep(0.05)
            t_ledger = time.time() - t0
            cpu_l = await cpu_snapshot(pool, db_name, named)
            m_l = machine_cpu()
            procs_l = process_cpu()
            print(f"ledger: {args.leads:,} recipients written in {t_ledger:.2f}s (send -> counts visible; "
                  f"{t_ledger / max(1e-9, t_floor):.2f}x the floor; target <= 20 s for 2,000,000)", flush=True)
            while True:
                c = await get(cid)
                if c["status"] in ("sent", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.25)
            t_end = time.time() - t0
            st = await fake_stats()
            sustained = st["emails"] / max(1e-9, st["last_at"] - st["first_at"])
            print(f"send (no rate limit): {st['emails']:,} emails, sustained {sustained:,.0f} emails/s "
                  f"(first->last provider call), end to end {args.leads / t_end:,.0f} emails/s in {t_end:.1f}s; "
                  f"target >= 20,000/s; {sustained / BASELINE_EMAILS_PER_SECOND:.0%} of the bare-pipeline ceiling "
                  f"({BASELINE_EMAILS_PER_SECOND:,}/s)", flush=True)
            cpu1 = await cpu_snapshot(pool, db_name, named)
            m1 = machine_cpu()
            procs_1 = process_cpu()
            used = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
            print("CPU per email (ledger + send): " + ", ".join(
                f"{k} {v / max(1, st['emails']) * 1e6:.0f} us" for k, v in used.items())
                + f"; total {sum(used.values()):.1f} CPU-s over {t_end:.1f} s wall on {os.cpu_count()} cores"
                + f" (load average now {os.getloadavg()[0]:.1f}: other work shares them)", flush=True)
            sending = {k: cpu1[k] - cpu_l.get(k, 0.0) for k in cpu1}
            busy, total = m1[0] - m_l[0], m1[1] - m_l[1]
            print("CPU per email (send phase only): " + ", ".join(
                f"{k} {v / max(1, st['emails']) * 1e6:.0f} us" for k, v in sending.items())
                + f"; machine busy {busy / max(1e-9, total):.0%} of {os.cpu_count()} cores, "
                + f"{busy / max(1, st['emails']) * 1e6:.0f} us per email all processes included "
                + f"({(busy - sum(sending.values())) / max(1, st['emails']) * 1e6:.0f} us outside the listed ones: "
                + "Redis, Postgres background work, other users)", flush=True)
            print("biggest CPU users of the send phase, per email: " + top_consumers(procs_l, procs_1, st["emails"]),
                  flush=True)
            # the HOT ratio of the messages updates (claim + record: 2 per email); backends report
            # their statistics up to ~10 s after going idle
            deadline = time.monotonic() + 15
            while True:
                upd, hot = await hot_counts(pool)
                upd, hot = upd - hot0[0], hot - hot0[1]
                if upd >= 2 * args.leads or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            print(f"HOT updates of messages: {hot:,} of {upd:,} ({hot / max(1, upd):.1%})", flush=True)
            print(f"exactly once: unique {st['unique_recipients']:,} of {args.leads:,}, duplicates {st['duplicates']}, "
                  f"campaign sent={c['sent']:,} failed={c['failed']} status={c['status']}", flush=True)
            ok = st["unique_recipients"] == args.leads and st["duplicates"] == 0 and c["sent"] == args.leads
            targets = {
                f"ledger <= {20 * args.leads / 2_000_000:.1f} s (20 s per 2,000,000)": t_ledger <= 20 * args.leads / 2_000_000,
                "sustained >= 20,000 emails/s": sustained >= 20_000,
                "every recipient exactly once": ok,
            }

            # -- run 2: rate_limit ---------------------------------------------------------
            if args.rate_limit > 0:
                async with s.post(f"{fake_url}/_reset") as r:
                    await r.read()
                async with s.put(f"{api_url}/api/settings/email", json={"rate_limit": args.rate_limit}) as r:
                    assert r.status == 200, await r.text()
                # workers apply a new rate within SETTINGS_CACHE_SECONDS (1 s; the contract says 5 s):
                # measure the limiter's accuracy, not that delay
                await asyncio.sleep(1.5)
                async with s.post(f"{api_url}/api/campaigns", json=await campaign_body(["rl"])) as r:
                    cid2 = (await r.json())["id"]
                async with s.post(f"{api_url}/api/campaigns/{cid2}/send") as r:
                    assert r.status == 202
                while (await get(cid2))["status"] not in ("sent", "failed", "cancelled"):
                    await asyncio.sleep(0.25)
                st = await fake_stats()
                first_batch = min(100, st["emails"])
                achieved = (st["emails"] - first_batch) / max(1e-9, st["last_at"] - st["first_at"])
                dev = (achieved - args.rate_limit) / args.rate_limit
                print(f"rate limit {args.rate_limit}/s: {st['emails']:,} emails, achieved {achieved:,.1f} emails/s "
                      f"({dev:+.1%} vs target; must be within 5 %), duplicates {st['duplicates']}", flush=True)
                targets[f"rate limit {args.rate_limit}/s within 5 %"] = abs(dev) <= 0.05 and st["duplicates"] == 0
        await pool.close()
        for name, met in targets.items():
            print(f"target {'met   ' if met else 'MISSED'}: {name}", flush=True)
        return 0
    finally:
        for p in reversed(procs):
            stop(p)
        await drop_database(admin_url, db_name)
        import redis

        r = redis.Redis.from_url(base.redis_url)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)
        r.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--leads", type=int, default=200_000, help="campaign size; 2000000 for the full-scale run")
    p.add_argument("--rate-limit", type=int, default=500, help="emails/s of the rate-limited run (0 skips it)")
    p.add_argument("--rate-leads", type=int, default=10_000,
                   help="recipients of the rate-limited run (20 s at 500/s); more gives a steadier figure")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--threads", type=int, default=8, help="threads (concurrent batches) per worker process")
    args = p.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
