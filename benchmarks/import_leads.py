"""Importer benchmark: 2,000,000 leads through the HTTP API and a real worker, vs. psql \\copy.

Two files, each measured side by side with its own floor in the same run:

* ``tagged`` (the primary line): what real exports look like -- tags on two rows of three in
  the shapes exporters write (``"Customer","VIP"``, ``vip, news``), a ``source`` column, accented
  names; 1 % invalid rows, 2 % repeated emails;
* ``plain``: the earlier tagless file (email, names, company, phone).

For each file, ``leads`` starts with 1,000,000 existing rows, then:

* baseline: ``psql \\copy`` into an UNLOGGED staging table plus one
  ``INSERT ... SELECT DISTINCT ON ... ON CONFLICT DO NOTHING`` (tags by ``string_to_array``)
  into a copy of ``leads`` that has only the unique ``lower(email)`` index, no GIN index, no
  triggers (no validation report, no progress, no resume: the floor an importer is measured
  against);
* importer: ``POST /api/upload`` to ``mailgenius serve importer`` and the import run by
  ``mailgenius worker importer`` until ``GET /api/imports/{id}`` says completed, into the real
  ``leads`` (all its indexes and triggers).

Prints both times, the ratio, rows per second, the worker's peak RSS (VmHWM of its processes)
and the load average. Targets: >= 100,000 rows/s end to end, <= 1.5x the baseline, worker peak
RSS <= 300 MB. The machine may be shared: the ratio to the floor of the same run is the figure
to compare.

    flock /tmp/mg-bench.lock .venv/bin/python benchmarks/import_leads.py \\
        [--rows 2000000] [--existing 1000000] [--variants tagged,plain] [--stack]

Uses its own database (``mailgenius_bench_import``, dropped at the end unless --keep) and
free ports, so it never touches a running stack.

``--stack`` measures the way users run it: the import goes to the stack ``make run`` started
(its importer API at ``MAILGENIUS_IMPORTER_URL``, its importer worker, its database at
``DATABASE_URL``, Prometheus scraping and the exporter collecting beside it), and the floor runs
in the same database. The stack's ``leads`` gains the ``--existing`` rows first (nothing is
truncated); at the end the benchmark deletes every lead it added, the floor's table and its API
key. Use a stack whose leads do not already hold the generated addresses (``lead.N@mail-N.example.com``),
e.g. a fresh ``make run``, or the counts will not match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.procs import free_port  # noqa: E402
from mailgenius import auth  # noqa: E402
from mailgenius.db import migrate, with_database  # noqa: E402
from mailgenius.settings import load_settings  # noqa: E402

FIRST = ["Ann", "Bob", "Carla", "Dmitri", "Eve", "Fatima", "Gus", "Hana", "Ivan", "June", "Kofi", "Lea"]
LAST = ["Smith", "Jones", "Garcia", "Silva", "Müller", "Rossi", "Dubois", "Kowalski", "Tanaka", "Okafor"]
FIRST_ACCENTED = ["José", "Zoë", "Ângela", "João", "Íñigo", "Chloé", "Søren", "Łukasz", "Renée", "Inês", "Björn",
                  "Ana"]
LAST_ACCENTED = ["Conceição", "Müller", "Peña", "Gonçalves", "Dvořák", "Ñúñez", "Åberg", "Sørensen", "Araújo",
                 "Smith"]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Stark Ind", "Wayne Ent", "Tyrell"]
#: tag cells as exports write them (Mailchimp quoted lists, comma lists); "" = no tags
TAG_CELLS = ['"Customer","VIP"', '"Newsletter"', "vip, news", '"Customer","Black Friday 2023"', "lead",
             '"Webinar","Newsletter","Customer"', "", "", ""]
SOURCES = ["landing-page", "webinar", "indicação", "feira", "", "instagram"]
INVALID = ["no-at-sign.example.com", "two@@example.com", "@missing-local.com", "trailing@dot.", "",
           "spaces in@example.com"]


def _cell(v: str) -> str:
    return '"' + v.replace('"', '""') + '"' if ('"' in v or "," in v) else v


def generate(path: Path, rows: int, variant: str = "tagged", seed: int = 42) -> dict[str, int]:
    """Write the CSV; return the exact expected counts."""
    rnd = random.Random(seed)
    expected = {"inserted": 0, "duplicates": 0, "invalid": 0}
    valid: list[int] = []
    tagged = variant == "tagged"
    first, last = (FIRST_ACCENTED, LAST_ACCENTED) if tagged else (FIRST, LAST)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("email,first_name,last_name,company,phone,tags,source\n" if tagged
                else "email,first_name,last_name,company,phone\n")
        chunk = []
        for i in range(rows):
            r = rnd.random()
            fn, ln = first[i % len(first)], last[(i // 7) % len(last)]
            if r < 0.01:
                email = INVALID[i % len(INVALID)]
                expected["invalid"] += 1
            elif r < 0.03 and valid:
                j = valid[rnd.randrange(len(valid))]
                email = f"Lead.{j:07d}@Mail-{j % 997}.Example.com"  # same address, other case
                expected["duplicates"] += 1
            else:
                email = f"lead.{i:07d}@mail-{i % 997}.example.com"
                valid.append(i)
                expected["inserted"] += 1
            line = f"{email},{fn},{ln},{COMPANIES[i % len(COMPANIES)]},+1 555 {i % 10_000_000:07d}"
            if tagged:
                line += f",{_cell(TAG_CELLS[i % len(TAG_CELLS)])},{SOURCES[i % len(SOURCES)]}"
            chunk.append(line + "\n")
            if len(chunk) >= 100_000:
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))
    return expected


_PREFILL = """INSERT INTO {table} (email, first_name, last_name, company, tags, source)
    SELECT 'existing.' || g || '@old-' || (g % 101) || '.example.org', 'Old', 'Lead', 'Legacy',
           ARRAY['legacy'], 'prefill'
    FROM generate_series(1, $1) g"""


#: what the benchmark adds to a running stack's leads (--stack), and removes at the end
_STACK_LEADS = """(source = 'prefill' AND email LIKE 'existing.%@old-%.example.org')
                  OR email LIKE 'lead.%@mail-%.example.com'"""


async def prefill(dsn: str, existing: int, *, stack: bool = False) -> None:
    """The real ``leads`` (all indexes and triggers) with ``existing`` rows, and the floor's
    ``bench_leads``: same columns and rows, only the unique lower(email) index. On a running
    stack (``stack``) nothing of the user's is truncated: only the benchmark's own rows go."""
    conn = await asyncpg.connect(dsn)
    try:
        if stack:
            await conn.execute(f"DELETE FROM leads WHERE {_STACK_LEADS}")
        else:
            await conn.execute("TRUNCATE leads, imports, import_errors RESTART IDENTITY CASCADE")
        await conn.execute(_PREFILL.format(table="leads"), existing)
        await conn.execute("DROP TABLE IF EXISTS bench_leads")
        await conn.execute("CREATE TABLE bench_leads (LIKE leads INCLUDING DEFAULTS)")
        await conn.execute(_PREFILL.format(table="bench_leads"), existing)
        await conn.execute("CREATE UNIQUE INDEX bench_leads_email_lower_key ON bench_leads (lower(email))")
        await conn.execute("VACUUM ANALYZE leads")
        await conn.execute("VACUUM ANALYZE bench_leads")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def baseline(dsn: str, csv_path: Path, variant: str) -> float:
    """psql \\copy into staging + one set-based merge into bench_leads; returns seconds."""
    tagged = variant == "tagged"
    cols = "email text, first_name text, last_name text, company text, phone text" + (
        ", tags text, source text" if tagged else "")
    setup = f"DROP TABLE IF EXISTS bench_stage; CREATE UNLOGGED TABLE bench_stage ({cols});"
    subprocess.run(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", "-c", setup], check=True)
    tags, source = ("COALESCE(string_to_array(tags, ','), '{}')", "source") if tagged else ("'{}'", "'baseline'")
    merge = rf"""INSERT INTO bench_leads (email, first_name, last_name, company, phone, tags, source)
        SELECT DISTINCT ON (lower(btrim(email))) btrim(email), first_name, last_name, company, phone,
               {tags}, {source}
        FROM bench_stage WHERE btrim(email) ~ '^[^@\s]+@[^@\s]+\.[^@\s]+$'
        ORDER BY lower(btrim(email))
        ON CONFLICT ((lower(email))) DO NOTHING"""
    t0 = time.perf_counter()
    subprocess.run(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1",
                    "-c", f"\\copy bench_stage FROM '{csv_path}' WITH (FORMAT csv, HEADER true)",
                    "-c", merge], check=True)
    elapsed = time.perf_counter() - t0
    subprocess.run(["psql", dsn, "-q", "-c", "DROP TABLE bench_stage"], check=True)
    return elapsed


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(d))
            except OSError:
                continue
    return out


def peak_rss_mb(pid: int) -> float:
    """Largest VmHWM (peak resident set) among the process and its descendants, MB."""
    best = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += _children(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


def _stages(log_path: Path) -> str:
    """The worker's per-stage seconds of the load (its "import load stages" log line)."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if "import load stages" in line:
            try:
                rec = json.loads(line)
            except ValueError:
                return line
            return " ".join(f"{k}={v}" for k, v in rec.items() if k.endswith("_s") or k == "rows")
    return "(no stage line in the worker log)"


def stack_worker_pids() -> list[int]:
    """The running stack's importer worker processes (``mailgenius worker importer`` runs
    ``dramatiq importer.actors``: its parent and its worker processes)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"importer.actors" in argv:  # dramatiq importer.actors ... (what `mailgenius worker importer` runs)
                pids.append(int(d))
    return pids


async def upload_and_wait(dsn: str, base: str, csv_path: Path) -> dict:
    """POST the file to the importer at ``base`` and poll until the import ends."""
    conn = await asyncpg.connect(dsn)
    key_id, key = await auth.create_key(conn, ["import"], "bench")
    await conn.close()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            t0 = time.perf_counter()
            with open(csv_path, "rb") as f:
                form = aiohttp.FormData()
                form.add_field("file", f, filename=csv_path.name, content_type="text/csv")
                async with http.post(base + "/api/upload", data=form, headers=headers) as r:
                    body = await r.json()
                    assert r.status == 202, body
            t_upload = time.perf_counter() - t0
            import_id = body["id"]
            samples = []
            while True:
                async with http.get(f"{base}/api/imports/{import_id}", headers=headers) as r:
                    view = await r.json()
                samples.append((time.perf_counter() - t0, view["processed_rows"]))
                if view["status"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.2)
            t_total = time.perf_counter() - t0
    finally:
        conn = await asyncpg.connect(dsn)
        await auth.revoke_key(conn, str(key_id))
        await conn.close()
    return {"total": t_total, "upload": t_upload, "view": view,
            "progress_updates": len({p for _, p in samples}), "started": view.get("started_at")}


async def run_on_stack(dsn: str, base: str, csv_path: Path) -> dict:
    """The import through a running ``make run`` stack (--stack)."""
    res = await upload_and_wait(dsn, base, csv_path)
    res["rss_mb"] = max((peak_rss_mb(p) for p in stack_worker_pids()), default=0.0)
    res["stages"] = "(in the stack's importer-worker log: the 'import load stages' line)"
    return res


async def run_importer(dsn: str, csv_path: Path, env: dict, workdir: Path) -> dict:
    api_port, metrics_port = free_port(), free_port()
    mg = str(Path(sys.executable).with_name("mailgenius"))
    logs = open(workdir / "services.log", "wb")
    api = subprocess.Popen([mg, "serve", "importer", "--port", str(api_port)], env=env, cwd=ROOT,
                           stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    worker = subprocess.Popen([mg, "worker", "importer", "--processes", "1", "--threads", "1",
                               "--metrics-port", str(metrics_port)], env=env, cwd=ROOT,
                              stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{api_port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            for _ in range(100):
                try:
                    async with http.get(base + "/api/health") as r:
                        if r.status in (200, 503):
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # let the worker boot too
        res = await upload_and_wait(dsn, base, csv_path)
        res["rss_mb"] = peak_rss_mb(worker.pid)
        res["stages"] = _stages(workdir / "services.log")
        return res
    finally:
        for p in (api, worker):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        logs.close()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows in the generated CSV")
    ap.add_argument("--existing", type=int, default=1_000_000, help="leads already in the table")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark database and files")
    ap.add_argument("--variants", default="tagged,plain", help="files to run: tagged, plain (comma-separated)")
    ap.add_argument("--stack", action="store_true",
                    help="import through the running `make run` stack (its importer, worker and database)")
    args = ap.parse_args()
    settings = load_settings()
    if args.stack:
        dsn = settings.database_url
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async with http.get(settings.importer_url + "/api/health") as r:
                    await r.read()
        except (aiohttp.ClientError, TimeoutError):
            print(f"--stack: no importer answers at {settings.importer_url}: start the stack (make run) first",
                  file=sys.stderr)
            return 2
        if not stack_worker_pids():
            print("--stack: no `mailgenius worker importer` process is running", file=sys.stderr)
            return 2
    else:
        dsn = with_database(settings.database_url, "mailgenius_bench_import")
        admin = await asyncpg.connect(with_database(settings.database_url, "postgres"))
        await admin.execute("DROP DATABASE IF EXISTS mailgenius_bench_import WITH (FORCE)")
        await admin.execute("CREATE DATABASE mailgenius_bench_import")
        await admin.close()
        await migrate(dsn)
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-import-"))
    prefix = f"mgbench-{os.getpid()}"
    ok = True
    try:
        results = []
        for variant in args.variants.split(","):
            csv_path = workdir / f"leads-{variant}.csv"
            t = time.perf_counter()
            expected = generate(csv_path, args.rows, variant)
            size = csv_path.stat().st_size
            print(f"[{variant}] generated {args.rows:,} rows, {size / 1e6:.0f} MB in {time.perf_counter() - t:.1f}s; "
                  f"expected {expected}")
            await prefill(dsn, args.existing, stack=args.stack)
            load_before = os.getloadavg()
            t_base = baseline(dsn, csv_path, variant)
            base_conn = await asyncpg.connect(dsn)
            base_inserted = await base_conn.fetchval("SELECT count(*) FROM bench_leads") - args.existing
            await base_conn.close()
            print(f"[{variant}] baseline psql \\copy + INSERT ... ON CONFLICT (unique lower(email) index only): "
                  f"{t_base:.2f}s ({args.rows / t_base:,.0f} rows/s, {base_inserted:,} inserted)")
            await prefill(dsn, args.existing, stack=args.stack)
            env = dict(os.environ)
            env.update({
                "DATABASE_URL": dsn, "MAILGENIUS_REDIS_PREFIX": prefix,
                "MAILGENIUS_DATA_DIR": str(workdir / "var"), "MAILGENIUS_UPLOAD_DIR": str(workdir / "uploads"),
                "MAILGENIUS_LOG_LEVEL": "info",  # the worker's "import load stages" line
            })
            res = (await run_on_stack(dsn, settings.importer_url, csv_path) if args.stack
                   else await run_importer(dsn, csv_path, env, workdir))
            load_after = os.getloadavg()
            v = res["view"]
            print(f"[{variant}] importer (HTTP upload + worker): {res['total']:.2f}s end to end "
                  f"({args.rows / res['total']:,.0f} rows/s); upload {res['upload']:.2f}s; status {v['status']}")
            print(f"  counts: inserted {v['inserted']:,} updated {v['updated']:,} duplicates {v['duplicates']:,} "
                  f"invalid {v['invalid']:,} (expected {expected['inserted']:,} / 0 / "
                  f"{expected['duplicates']:,} / {expected['invalid']:,})")
            exact = (v["inserted"], v["duplicates"], v["invalid"]) == (
                expected["inserted"], expected["duplicates"], expected["invalid"])
            if variant == "tagged" and exact:
                conn = await asyncpg.connect(dsn)
                n_tagged = await conn.fetchval("SELECT count(*) FROM leads WHERE import_id = $1 AND tags <> '{}'",
                                               v["id"])
                await conn.close()
                print(f"  leads with tags: {n_tagged:,}")
            ok = ok and exact
            print(f"  counts exact: {exact}; distinct progress values seen while polling: {res['progress_updates']}")
            print(f"  worker stages (s): {res['stages']}")
            print(f"  worker peak RSS: {res['rss_mb']:.0f} MB (target <= 300); load average before/after "
                  f"{load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} CPUs")
            ratio = res["total"] / t_base
            results.append(f"RESULT variant={variant}{' (make run stack)' if args.stack else ''} rows={args.rows} "
                           f"baseline_s={t_base:.2f} "
                           f"importer_s={res['total']:.2f} ratio={ratio:.2f} (target <= 1.5) "
                           f"rows_per_s={args.rows / res['total']:,.0f} (target >= 100,000) "
                           f"worker_peak_rss_mb={res['rss_mb']:.0f} load1={load_after[0]:.1f}")
            print(results[-1], flush=True)
        print("\n".join(results))
        return 0 if ok else 1
    finally:
        if args.stack:  # the stack is the user's: take back exactly what the benchmark added
            shutil.rmtree(workdir, ignore_errors=True)
            conn = await asyncpg.connect(dsn)
            removed = await conn.execute(f"DELETE FROM leads WHERE {_STACK_LEADS}")
            await conn.execute("DROP TABLE IF EXISTS bench_leads")
            await conn.close()
            print(f"--stack: removed the benchmark's leads ({removed}) and its floor table")
        elif not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            admin = await asyncpg.connect(with_database(settings.database_url, "postgres"))
            await admin.execute("DROP DATABASE IF EXISTS mailgenius_bench_import WITH (FORCE)")
            await admin.close()
        import redis

        r = redis.Redis.from_url(settings.redis_url)
        for k in ([] if args.stack else r.scan_iter(match=f"{prefix}*", count=1000)):
            r.delete(k)
        r.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
