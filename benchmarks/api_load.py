"""API load benchmark: open-loop load on loopback against the sender, importer and exporter APIs,
with a bare aiohttp endpoint measured in the same run as the ceiling.

    .venv/bin/python benchmarks/api_load.py                 # 2,000 req/s for 60 s per target
    .venv/bin/python benchmarks/api_load.py --duration 10   # quicker look

What it does:

1. Creates (once) a dedicated benchmark database (``mailgenius_bench`` on the configured Postgres
   server; never the default ``mailgenius`` one), migrates it, and fills it with set-based SQL:
   one campaign with 2,000,000 recipients (2,000,000 real ``messages`` rows, so counting them
   would be a visible scan) and one completed import. Later runs reuse the data.
2. Starts ``mailgenius serve sender|importer|exporter`` and a bare aiohttp app (one JSON route,
   no middleware) as subprocesses on free ports, with their own Redis prefix.
3. For each target: a warm-up, then **open-loop** load at ``--rate`` req/s for ``--duration`` s:
   requests are scheduled at fixed instants, whatever the server does, and each latency is
   measured from the instant the request *should* have left (so queueing caused by a slow server
   counts, no coordinated omission). Then a short saturation phase (closed loop, ``--concurrency``
   connections) measures the most req/s each target sustains; our throughput is printed as a
   share of the bare endpoint's.
4. Beside latency, each target's **server CPU per request** (user + system time of the service
   process during the open-loop phase, from /proc, over the requests completed): the figure that
   decides whether 2,000 req/s fit on a core, and much less sensitive than p99 to what else runs
   on the machine. ``--timeline`` prints each second's p99/max (are slow requests a burst?).

Why our own generator rather than wrk: wrk (Debian) is closed-loop — each connection waits for
its answer before sending the next request — so a slow server silently lowers the offered load
and hides its latency; wrk2, the open-loop fork, is not packaged. The generator runs in its own
process (so it does not share an event loop with anything it measures), speaks raw HTTP/1.1 over
keep-alive connections (far cheaper per request than a full client) and reports p50/p95/p99/max,
errors and the achieved rate. On this 2-core machine the generator and the server share the
cores: figures are a floor for a real deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.procs import free_port  # noqa: E402

#: the benchmark database (on the configured Postgres server)
BENCH_DB = "mailgenius_bench"
#: recipients of the benchmark campaign
CAMPAIGN_RECIPIENTS = 2_000_000
#: the latency target of the issue, milliseconds
P99_TARGET_MS = 25.0
#: seconds after its scheduled instant at which a request not yet sent counts as a timeout
GIVE_UP = 5.0


# -- load generator (runs in its own process) ----------------------------------------------------

async def _request(reader, writer, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


def _raw(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_loop(host, port, path, headers, rate: float, duration: float, max_conns: int) -> dict:
    """Fire ``rate`` req/s for ``duration`` s on a schedule; latency from the scheduled instant."""
    raw = _raw(host, port, path, headers)
    queue: asyncio.Queue[float] = asyncio.Queue()
    latencies: list[float] = []
    #: per second of the schedule: the latencies of the requests scheduled in it
    by_second: dict[int, list[float]] = {}
    errors: dict[str, int] = {}
    done = 0

    async def connection():
        nonlocal done
        reader = writer = None
        while True:
            intended = await queue.get()
            if intended < 0:
                break
            if time.perf_counter() - intended > GIVE_UP:
                # the server is this far behind: count it as a timeout instead of queueing for ever
                errors["timeout"] = errors.get("timeout", 0) + 1
                latencies.append(time.perf_counter() - intended)
                done += 1
                continue
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status = await _request(reader, writer, raw)
                if status >= 400:
                    errors[str(status)] = errors.get(str(status), 0) + 1
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if writer is not None:
                    writer.close()
                reader = writer = None
            lat = time.perf_counter() - intended
            latencies.append(lat)
            by_second.setdefault(int(intended - start), []).append(lat)
            done += 1
        if writer is not None:
            writer.close()

    total = int(rate * duration)
    start = time.perf_counter()
    workers = [asyncio.ensure_future(connection()) for _ in range(max_conns)]
    for i in range(total):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        queue.put_nowait(at)
    sent_elapsed = time.perf_counter() - start
    for _ in workers:
        queue.put_nowait(-1.0)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), GIVE_UP + 10)
    except TimeoutError:
        errors["unfinished"] = total - done
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else float("nan")

    seconds = []
    for sec, lats in sorted(by_second.items()):
        lats.sort()
        seconds.append([sec, round(lats[min(len(lats) - 1, int(0.99 * len(lats)))] * 1000, 2),
                        round(lats[-1] * 1000, 1)])
    return {"requests": total, "completed": done, "errors": errors, "offered_rps": total / sent_elapsed,
            "seconds": seconds,
            "achieved_rps": done / elapsed, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "max_ms": latencies[-1] * 1000 if latencies else float("nan")}


async def closed_loop(host, port, path, headers, duration: float, concurrency: int) -> dict:
    """As fast as possible on ``concurrency`` keep-alive connections: the sustainable rate."""
    raw = _raw(host, port, path, headers)
    count = 0
    errs = 0
    end = time.perf_counter() + duration

    async def connection():
        nonlocal count, errs
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < end:
            try:
                status = await _request(reader, writer, raw)
                errs += status >= 400
            except (OSError, asyncio.IncompleteReadError):
                errs += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            count += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {"rps": count / (time.perf_counter() - start), "errors": errs}


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="api_load.py generate")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--rate", type=float, default=2000)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--max-conns", type=int, default=64)
    p.add_argument("--saturate", type=float, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    a = p.parse_args(argv)
    headers = dict(h.split(": ", 1) for h in a.header)
    out: dict = {}
    if a.duration > 0:
        out["open"] = asyncio.run(open_loop("127.0.0.1", a.port, a.path, headers, a.rate, a.duration, a.max_conns))
    if a.saturate > 0:
        out["closed"] = asyncio.run(closed_loop("127.0.0.1", a.port, a.path, headers, a.saturate, a.concurrency))
    print(json.dumps(out))
    return 0


# -- bare aiohttp ceiling (runs in its own process) ----------------------------------------------

def bare_main(argv: list[str]) -> int:
    from aiohttp import web

    async def handler(request):
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.router.add_get("/api/health", handler)
    web.run_app(app, host="127.0.0.1", port=int(argv[0]), print=None, access_log=None)
    return 0


# -- orchestration ---------------------------------------------------------------------------------

def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


async def prepare_database(settings, *, rebuild: bool) -> dict:
    """The benchmark database and its data (set-based SQL; reused across runs)."""
    import asyncpg

    from mailgenius import auth
    from mailgenius.db import ensure_database, migrate, with_database

    url = with_database(settings.database_url, BENCH_DB)
    if rebuild:
        admin = await asyncpg.connect(with_database(settings.database_url, "postgres"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        await admin.close()
    await ensure_database(url)
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        campaign_id = await conn.fetchval("SELECT id FROM campaigns WHERE name = 'bench-2m' LIMIT 1")
        if campaign_id is None:
            t = time.perf_counter()
            print(f"  creating the benchmark campaign with {CAMPAIGN_RECIPIENTS:,} recipients ...", flush=True)
            async with conn.transaction():
                campaign_id = await conn.fetchval(
                    """INSERT INTO campaigns (name, subject, from_email, html, text, status, recipients,
                                              queued, sent, delivered, bounced, opened, clicked, failed,
                                              started_at, finished_at)
                       VALUES ('bench-2m', 'Benchmark', 'bench@example.com', '<p>hi</p>', 'hi', 'sent',
                               $1::bigint, 0, $1::bigint, $1::bigint - 20000, 15000, 500000, 120000, 5000, now(), now())
                       RETURNING id""", CAMPAIGN_RECIPIENTS)
                await conn.execute(
                    """INSERT INTO messages (campaign_id, email, batch, status, delivery, provider,
                                             attempts, sent_at)
                       SELECT $1, 'lead' || g || '@bench.example.com', g / 1000,
                              CASE WHEN g % 400 = 0 THEN 'failed' ELSE 'sent' END,
                              CASE WHEN g % 100 = 0 THEN 'bounced' ELSE 'delivered' END,
                              'smtp', 1, now()
                       FROM generate_series(1, $2) AS g""", campaign_id, CAMPAIGN_RECIPIENTS)
            await conn.execute("ANALYZE messages")
            print(f"  done in {time.perf_counter() - t:.1f} s", flush=True)
        import_id = await conn.fetchval("SELECT id FROM imports WHERE filename = 'bench.csv' LIMIT 1")
        if import_id is None:
            import_id = await conn.fetchval(
                """INSERT INTO imports (status, filename, bytes, total_rows, processed_rows, inserted,
                                        updated, duplicates, invalid, started_at, finished_at)
                   VALUES ('completed', 'bench.csv', 250000000, 2000000, 2000000, 1990000, 0, 5000,
                           5000, now() - interval '20 seconds', now()) RETURNING id""")
        await conn.execute("DELETE FROM api_keys WHERE name = 'bench'")
        _id, key = await auth.create_key(conn, ["read"], "bench")
        messages = await conn.fetchval("SELECT reltuples::bigint FROM pg_class WHERE relname = 'messages'")
    finally:
        await conn.close()
    return {"url": url, "campaign_id": campaign_id, "import_id": import_id, "key": key, "messages": messages}


class Services:
    def __init__(self, settings, data: dict, tmp: Path):
        self.procs: list[subprocess.Popen] = []
        self.by_name: dict[str, subprocess.Popen] = {}
        self.ports = {name: free_port() for name in ("sender", "importer", "exporter", "bare",
                                                     "sender-worker", "importer-worker")}
        self.tmp = tmp
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGENIUS_")}
        env.update({
            "DATABASE_URL": data["url"], "REDIS_URL": settings.redis_url, "BROKER_URL": settings.redis_url,
            "MAILGENIUS_REDIS_PREFIX": f"mgbench-{os.getpid()}", "MAILGENIUS_LOG_LEVEL": "warning",
            "MAILGENIUS_DATA_DIR": str(tmp / "var"),
            "MAILGENIUS_SENDER_PORT": str(self.ports["sender"]),
            "MAILGENIUS_IMPORTER_PORT": str(self.ports["importer"]),
            "MAILGENIUS_EXPORTER_PORT": str(self.ports["exporter"]),
            "MAILGENIUS_SENDER_URL": f"http://127.0.0.1:{self.ports['sender']}",
            "MAILGENIUS_IMPORTER_URL": f"http://127.0.0.1:{self.ports['importer']}",
            "MAILGENIUS_EXPORTER_URL": f"http://127.0.0.1:{self.ports['exporter']}",
            "MAILGENIUS_PUBLIC_URL": f"http://127.0.0.1:{self.ports['sender']}",
            "MAILGENIUS_SENDER_WORKER_METRICS_PORT": str(self.ports["sender-worker"]),
            "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT": str(self.ports["importer-worker"]),
            "MAILGENIUS_PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}",
            "MAILGENIUS_ALERTMANAGER_URL": f"http://127.0.0.1:{free_port()}",
        })
        self.env = env

    def start(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        if name == "bare":
            argv = [sys.executable, __file__, "bare", str(self.ports["bare"])]
        else:
            argv = [str(Path(sys.executable).with_name("mailgenius")), "serve", name]
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        self.procs.append(proc)
        self.by_name[name] = proc
        wait_http(f"http://127.0.0.1:{self.ports[name]}/api/health", proc=proc)

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU the service's process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.by_name[name].pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def run_generator(port: int, path: str, headers: dict, *, rate: float, duration: float,
                  saturate: float, concurrency: int) -> dict:
    argv = [sys.executable, __file__, "generate", "--port", str(port), "--path", path,
            "--rate", str(rate), "--duration", str(duration), "--saturate", str(saturate),
            "--concurrency", str(concurrency)]
    for k, v in headers.items():
        argv += ["--header", f"{k}: {v}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + saturate + 180)
    if out.returncode != 0:
        raise RuntimeError(f"generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    if argv[:1] == ["bare"]:
        return bare_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=2000,
                   help="offered load per target, req/s (default 2000: the issue's target)")
    p.add_argument("--duration", type=float, default=60,
                   help="seconds of open-loop load per target (default 60; lower for a quick look)")
    p.add_argument("--saturate", type=float, default=10,
                   help="seconds of closed-loop saturation per target for the ceiling ratio (default 10; 0 skips)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="connections of the saturation phase (default 16)")
    p.add_argument("--only", "--targets", dest="only", default="",
                   help="comma-separated subset of targets: bare,sender-health,importer-health,exporter-health,campaign,import (default all)")
    p.add_argument("--timeline", action="store_true",
                   help="also print each second's p99/max (default off; to see whether slow requests come in bursts)")
    p.add_argument("--rebuild", action="store_true",
                   help=f"drop and recreate the {BENCH_DB} database first (default: reuse its data)")
    a = p.parse_args(argv)

    from mailgenius.settings import load_settings

    settings = load_settings()
    print(f"api_load: {a.rate:g} req/s open loop for {a.duration:g} s per target, "
          f"then {a.saturate:g} s closed loop x{a.concurrency}; load average {os.getloadavg()[0]:.2f}")
    data = asyncio.run(prepare_database(settings, rebuild=a.rebuild))
    print(f"  database {BENCH_DB}: campaign {data['campaign_id']} ({CAMPAIGN_RECIPIENTS:,} recipients, "
          f"~{data['messages']:,} message rows), import {data['import_id']}")
    auth = {"Authorization": f"Bearer {data['key']}"}
    targets = [
        ("bare", "bare", "/api/health", {}),
        ("sender-health", "sender", "/api/health", {}),
        ("importer-health", "importer", "/api/health", {}),
        ("exporter-health", "exporter", "/api/health", {}),
        ("campaign", "sender", f"/api/campaigns/{data['campaign_id']}", auth),
        ("import", "importer", f"/api/imports/{data['import_id']}", auth),
    ]
    if a.only:
        wanted = set(a.only.split(","))
        targets = [t for t in targets if t[0] in wanted or t[0] == "bare"]
    tmp = Path(tempfile.mkdtemp(prefix="api_load-"))
    services = Services(settings, data, tmp)
    results: dict[str, dict] = {}
    try:
        for name in dict.fromkeys(t[1] for t in targets):
            services.start(name)
        for label, svc, path, headers in targets:
            port = services.ports[svc]
            # warm-up: pools, caches, the auth cache
            run_generator(port, path, headers, rate=200, duration=2, saturate=0, concurrency=1)
            cpu0 = services.cpu_seconds(svc)
            try:
                # the open-loop phase alone, so the server's CPU per request is measured on it
                res = run_generator(port, path, headers, rate=a.rate, duration=a.duration,
                                    saturate=0, concurrency=a.concurrency)
                cpu = services.cpu_seconds(svc) - cpu0
                if a.saturate > 0:
                    res.update(run_generator(port, path, headers, rate=a.rate, duration=0,
                                             saturate=a.saturate, concurrency=a.concurrency))
            except RuntimeError as exc:
                print(f"  {label:<16} generator failed: {str(exc)[-300:]}", flush=True)
                continue
            results[label] = res
            o = res["open"]
            o["cpu_us"] = cpu / max(o["completed"], 1) * 1e6
            print(f"  {label:<16} {path:<26} p50 {o['p50_ms']:6.2f} ms  p95 {o['p95_ms']:6.2f} ms  "
                  f"p99 {o['p99_ms']:7.2f} ms  max {o['max_ms']:7.1f} ms  achieved {o['achieved_rps']:7.0f} req/s  "
                  f"server CPU {o['cpu_us']:4.0f} µs/req  errors {sum(o['errors'].values())} {o['errors'] or ''}",
                  flush=True)
            if a.timeline:
                print("    per second p99/max ms: " + "  ".join(f"{s}:{p99:g}/{mx:g}" for s, p99, mx in o["seconds"]),
                      flush=True)
    finally:
        services.stop()
    print()
    ceiling = results.get("bare", {}).get("closed", {}).get("rps")
    ok = True
    print(f"{'target':<16} {'p99 ms':>8} {'target':>8} {'errors':>7} {'CPU µs/req':>10} {'max req/s':>10} "
          f"{'of ceiling':>11}")
    for label, res in results.items():
        o = res["open"]
        errs = sum(o["errors"].values())
        sat = res.get("closed", {}).get("rps")
        share = f"{sat / ceiling * 100:10.1f}%" if sat and ceiling else f"{'-':>11}"
        meets = o["p99_ms"] < P99_TARGET_MS and errs == 0 and o["completed"] == o["requests"]
        ok &= meets or label == "bare"
        sat_errs = res.get("closed", {}).get("errors", 0)
        print(f"{label:<16} {o['p99_ms']:8.2f} {'<' + str(P99_TARGET_MS):>8} {errs:7d} {o['cpu_us']:10.0f} "
              f"{(f'{sat:10.0f}' if sat else '-'):>10} {share}  {'OK' if meets else 'MISSED'}"
              + (f"  ({sat_errs} errors while saturating)" if sat_errs else ""))
    print(f"\nbare aiohttp ceiling: {ceiling:.0f} req/s" if ceiling else "")
    print(f"logs: {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
