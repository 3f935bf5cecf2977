"""Import jobs end to end: exact metrics, update mode, concurrent overlapping imports, cancel
of a running import, and resume after a real worker is killed with -9 mid-import."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from .conftest import upload, wait_status

LEAD_COLUMNS = "lower(email) AS k, email, first_name, last_name, company, tags, attributes::text AS attrs, import_id"


def make_csv(path: Path, n: int, *, seed: int = 7, start: int = 0, name: str = "N") -> dict:
    """n rows, ~1 % invalid, ~3 % repeats (other case): returns expected counts, error lines and
    the first-seen row of every valid address (the expected leads)."""
    rnd = random.Random(seed)
    lines = ["email,first_name,company,score"]
    leads: dict[str, tuple] = {}
    errors: list[tuple[int, str]] = []
    valid: list[int] = []
    for i in range(start, start + n):
        line_no = len(lines) + 1
        r = rnd.random()
        if r < 0.01:
            lines.append(f"broken{i}.example.com,{name}{i},Co,{i}")
            errors.append((line_no, "invalid_syntax"))
            continue
        if r < 0.04 and valid:
            j = rnd.choice(valid)
            lines.append(f"USER{j}@Example.COM,{name}dup{i},Co,{i}")
            errors.append((line_no, "duplicate"))
            continue
        email = f"user{i}@example.com"
        lines.append(f"{email},{name}{i},Co {i % 10},{i}")
        valid.append(i)
        leads[email] = (email, f"{name}{i}", f"Co {i % 10}", f'{{"score": "{i}"}}')
    path.write_text("\n".join(lines) + "\n")
    return {"inserted": len(leads), "duplicates": sum(1 for e in errors if e[1] == "duplicate"),
            "invalid": sum(1 for e in errors if e[1] == "invalid_syntax"), "errors": errors, "leads": leads,
            "rows": n}


async def test_metrics_move_by_exactly_the_imported_counts(api, job_runner, pool, tmp_path):
    exp = make_csv(tmp_path / "a.csv", 3000)
    iid = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
    assert await job_runner(iid, batch_rows=700) == "completed"
    reg = job_runner.registry

    def val(name, **labels):
        return reg.get_sample_value(name, labels)

    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", iid)
    assert (row["inserted"], row["duplicates"], row["invalid"]) == (exp["inserted"], exp["duplicates"], exp["invalid"])
    assert val("mailgenius_import_rows_total", outcome="inserted") == exp["inserted"]
    assert val("mailgenius_import_rows_total", outcome="updated") == 0
    assert val("mailgenius_import_rows_total", outcome="duplicate") == exp["duplicates"]
    assert val("mailgenius_import_rows_total", outcome="invalid") == exp["invalid"]
    assert val("mailgenius_import_validation_errors_total", reason="invalid_syntax") == exp["invalid"]
    assert val("mailgenius_import_validation_errors_total", reason="duplicate") == exp["duplicates"]
    assert val("mailgenius_import_validation_errors_total", reason="missing_email") == 0
    assert val("mailgenius_import_jobs_total", status="completed") == 1
    assert val("mailgenius_import_duration_seconds_count") == 1
    # error rows: exactly the expected lines, duplicates found across batches too
    got = [(r["line"], r["reason"]) for r in await pool.fetch(
        "SELECT line, reason FROM import_errors WHERE import_id = $1 ORDER BY line", iid)]
    assert got == exp["errors"]
    # a second import of the same file in skip mode: every valid row meets an existing lead
    iid2 = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
    await job_runner(iid2, batch_rows=700)
    row2 = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", iid2)
    assert (row2["inserted"], row2["skipped_existing"], row2["duplicates"]) == (
        0, exp["inserted"], exp["inserted"] + exp["duplicates"])
    assert val("mailgenius_import_rows_total", outcome="inserted") == exp["inserted"]
    assert val("mailgenius_import_rows_total", outcome="duplicate") == 2 * exp["duplicates"] + exp["inserted"]
    # the in-file repeats are still reported as duplicates, the existing leads are not errors
    assert await pool.fetchval("SELECT count(*) FROM import_errors WHERE import_id = $1 AND reason = 'duplicate'",
                               iid2) == exp["duplicates"]


async def test_update_mode_updates_existing_and_merges_tags(api, job_runner, pool, tmp_path):
    (tmp_path / "a.csv").write_text("email,first_name,company\nann@example.com,Ann,Acme\nbob@example.com,Bob,\n")
    (tmp_path / "b.csv").write_text(
        "email,first_name,company,tags\nANN@example.com,Annie,,vip\ncarl@example.com,Carl,C,\n"
        "ann@EXAMPLE.com,Again,,\n")
    a = (await (await upload(api, tmp_path / "a.csv", tags="old")).json())["id"]
    await job_runner(a)
    b = (await (await upload(api, tmp_path / "b.csv", tags="new", mode="update")).json())["id"]
    await job_runner(b, batch_rows=2)
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", b)
    assert (row["inserted"], row["updated"], row["duplicates"], row["invalid"]) == (1, 1, 1, 0)
    ann = await pool.fetchrow("SELECT * FROM leads WHERE lower(email) = 'ann@example.com'")
    assert ann["email"] == "ann@example.com"  # the stored address keeps its first spelling
    assert (ann["first_name"], ann["company"]) == ("Annie", "Acme")  # empty cells never erase
    assert ann["tags"] == ["new", "old", "vip"]
    assert ann["import_id"] == b
    assert await pool.fetchval("SELECT tags FROM leads WHERE email = 'bob@example.com'") == ["old"]
    assert job_runner.registry.get_sample_value("mailgenius_import_rows_total", {"outcome": "updated"}) == 1


async def test_concurrent_overlapping_imports_never_duplicate_a_lead(api, job_runner, pool, tmp_path):
    # Given two files sharing 1,500 addresses; When both import at once in small batches
    exp_a = make_csv(tmp_path / "a.csv", 3000, seed=1, start=0, name="A")
    exp_b = make_csv(tmp_path / "b.csv", 3000, seed=2, start=1500, name="B")
    a = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
    b = (await (await upload(api, tmp_path / "b.csv")).json())["id"]
    assert await asyncio.gather(job_runner(a, batch_rows=200), job_runner(b, batch_rows=200)) == [
        "completed", "completed"]
    # Then every address is one lead and the counts add up exactly
    union = set(exp_a["leads"]) | set(exp_b["leads"])
    total, distinct = await pool.fetchrow("SELECT count(*), count(DISTINCT lower(email)) FROM leads")
    assert total == distinct == len(union)
    ra = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", a)
    rb = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", b)
    assert ra["inserted"] + rb["inserted"] == len(union)
    for r, exp in ((ra, exp_a), (rb, exp_b)):
        assert r["processed_rows"] == exp["rows"] == r["inserted"] + r["duplicates"] + r["invalid"]
        assert r["invalid"] == exp["invalid"]
        assert r["inserted"] + r["skipped_existing"] == exp["inserted"]
        assert r["duplicates"] == exp["duplicates"] + r["skipped_existing"]
        assert await pool.fetchval("SELECT count(*) FROM import_errors WHERE import_id = $1", r["id"]) == len(exp["errors"])
    assert await pool.fetchval("SELECT count(*) FROM leads WHERE import_id = $1", a) == ra["inserted"]


async def test_cancel_running_import_stops_within_2s_and_says_what_was_kept(api, job_runner, pool, tmp_path):
    make_csv(tmp_path / "a.csv", 20_000)
    iid = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
    job = asyncio.create_task(job_runner(iid, batch_rows=500, batch_pause=0.3))
    deadline = time.monotonic() + 20
    while await pool.fetchval("SELECT processed_rows FROM imports WHERE id = $1", iid) < 1000:
        assert time.monotonic() < deadline and not job.done()
        await asyncio.sleep(0.05)
    # live progress is visible while running
    view = await (await api.get(f"/api/imports/{iid}", headers=api.headers_)).json()
    assert view["status"] == "running" and view["processed_rows"] >= 1000
    assert view["rows_per_second"] > 0 and view["eta_seconds"] > 0
    t0 = time.monotonic()
    resp = await api.post(f"/api/imports/{iid}/cancel", headers=api.headers_)
    elapsed = time.monotonic() - t0
    body = await resp.json()
    assert resp.status == 200, body
    assert elapsed < 2.0
    assert body["status"] == "cancelled"
    assert await asyncio.wait_for(job, 5) == "cancelled"
    kept = body["kept"]
    assert 1000 <= kept["processed_rows"] < 20_000
    assert f"{kept['processed_rows']} rows processed" in body["message"]
    # what the response says was kept is what the tables hold
    assert await pool.fetchval("SELECT count(*) FROM leads WHERE import_id = $1", iid) == kept["inserted"]
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", iid)
    assert row["processed_rows"] == kept["processed_rows"] and row["status"] == "cancelled"
    assert job_runner.registry.get_sample_value("mailgenius_import_jobs_total", {"status": "cancelled"}) == 1


@pytest.mark.slow
async def test_worker_killed_with_sigkill_resumes_from_checkpoint(api, pool, tmp_path, start_worker):
    # Given a real worker importing a file in slow, small batches
    exp = make_csv(tmp_path / "a.csv", 8000)
    w1 = start_worker(MAILGENIUS_IMPORT_BATCH_ROWS="500", MAILGENIUS_IMPORT_BATCH_PAUSE_MS="250")
    iid = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
    deadline = time.monotonic() + 45
    while await pool.fetchval("SELECT processed_rows FROM imports WHERE id = $1", iid) < 2000:
        assert time.monotonic() < deadline, w1.output()
        await asyncio.sleep(0.05)
    # When it is killed with -9 mid-import
    w1.kill9()
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", iid)
    assert row["status"] == "running" and 2000 <= row["processed_rows"] < 8000
    assert row["checkpoint_offset"] > 0
    # and another worker starts: the broker redelivers the message
    w2 = start_worker(MAILGENIUS_IMPORT_BATCH_ROWS="500")
    row = await wait_status(pool, iid, timeout=60)
    assert row["status"] == "completed", (row, w2.output())
    # Then it resumed (second attempt) and everything is as after an uninterrupted run
    assert row["attempts"] == 2
    assert (row["inserted"], row["duplicates"], row["invalid"], row["processed_rows"]) == (
        exp["inserted"], exp["duplicates"], exp["invalid"], 8000)
    got = [(r["line"], r["reason"]) for r in await pool.fetch(
        "SELECT line, reason FROM import_errors WHERE import_id = $1 ORDER BY line", iid)]
    assert got == exp["errors"]
    leads = {r["email"]: (r["email"], r["first_name"], r["company"], r["attrs"]) for r in await pool.fetch(
        f"SELECT {LEAD_COLUMNS} FROM leads ORDER BY 1")}
    assert leads == exp["leads"]


async def test_cancel_interrupts_a_slow_merge(api, job_runner, pool, tmp_path):
    # Given a merge statement that takes 20 s (a test trigger sleeps in it)
    await pool.execute("""
        CREATE OR REPLACE FUNCTION test_slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(20); RETURN NULL; END $$;
        CREATE TRIGGER test_slow_insert BEFORE INSERT ON leads
            FOR EACH STATEMENT EXECUTE FUNCTION test_slow_insert();""")
    try:
        make_csv(tmp_path / "a.csv", 500)
        iid = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
        job = asyncio.create_task(job_runner(iid))
        deadline = time.monotonic() + 10
        while not await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%INSERT INTO leads AS l%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"):
            assert time.monotonic() < deadline and not job.done()
            await asyncio.sleep(0.05)
        # When it is cancelled mid-statement; Then it stops within 2 s, keeping nothing
        t0 = time.monotonic()
        resp = await api.post(f"/api/imports/{iid}/cancel", headers=api.headers_)
        body = await resp.json()
        assert time.monotonic() - t0 < 2.0
        assert resp.status == 200 and body["status"] == "cancelled", body
        assert body["kept"]["processed_rows"] == 0
        assert await asyncio.wait_for(job, 5) == "cancelled"
        assert await pool.fetchval("SELECT count(*) FROM leads") == 0
    finally:
        await pool.execute("DROP TRIGGER IF EXISTS test_slow_insert ON leads; DROP FUNCTION IF EXISTS test_slow_insert()")


async def test_without_a_spare_connection_the_batches_run_on_one_session(api, pool, settings, tmp_path):
    """The load overlaps two sessions (COPY of batch n+1 while batch n merges); when the pool
    has no spare connection for the second within STAGING_ACQUIRE_TIMEOUT (every other one
    busy), the batches run one after the other on one session, with the same result."""
    from prometheus_client import CollectorRegistry

    from importer import loader
    from mailgenius.cache import create_redis

    exp = make_csv(tmp_path / "a.csv", 2500, seed=11)
    iid = (await (await upload(api, tmp_path / "a.csv")).json())["id"]
    refused = []

    class Exhausted:
        """The real pool, except that the staging session's acquisition finds it exhausted
        (what asyncpg raises when its timeout passes with every connection in use)."""

        def __init__(self, pool):
            self._pool = pool

        def acquire(self, *args, timeout=None, **kw):
            if timeout == loader.STAGING_ACQUIRE_TIMEOUT:
                refused.append(timeout)
                raise TimeoutError
            return self._pool.acquire(*args, timeout=timeout, **kw)

        def __getattr__(self, name):
            return getattr(self._pool, name)

    redis = create_redis(settings.redis_url)
    try:
        status = await loader.run_import(Exhausted(pool), redis, settings, iid,
                                         metrics=loader.ImportMetrics(CollectorRegistry()),
                                         options=loader.ImportOptions(batch_rows=300))
    finally:
        await redis.aclose()
    assert status == "completed"
    assert refused == [loader.STAGING_ACQUIRE_TIMEOUT]  # the second session was asked for once
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", iid)
    assert (row["inserted"], row["duplicates"], row["invalid"]) == (exp["inserted"], exp["duplicates"], exp["invalid"])
    got = [(r["line"], r["reason"]) for r in await pool.fetch(
        "SELECT line, reason FROM import_errors WHERE import_id = $1 ORDER BY line", iid)]
    assert got == exp["errors"]
    leads = {r["email"]: (r["email"], r["first_name"], r["company"], r["attrs"]) for r in await pool.fetch(
        "SELECT email, first_name, company, attributes::text AS attrs FROM leads WHERE import_id = $1", iid)}
    assert leads == exp["leads"]
