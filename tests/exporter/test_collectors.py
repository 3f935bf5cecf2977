"""The collectors against ground truth: real Postgres rows, real dramatiq messages in Redis."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
import time

import pytest

from exporter.collectors import COLLECT_ERRORS, COLLECTOR_UP, LEAD_DELTA_COMPACT_AT, SNAPSHOT_AGE
from mailgenius import metrics as m
from mailgenius.worker import enqueue
from tests.conftest import bearer, free_port

LEAD_STATUSES = ("active", "unsubscribed", "bounced", "complained")


async def lead_truth(pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM leads GROUP BY status")
    truth = dict.fromkeys(LEAD_STATUSES, 0)
    truth.update({r["status"]: r["n"] for r in rows})
    return truth


def exported_leads(registry) -> dict[str, float]:
    return {s: registry.get_sample_value(m.LEADS, {"status": s}) for s in LEAD_STATUSES}


async def test_lead_gauges_equal_ground_truth_through_inserts_updates_deletes(exporter, pool):
    # Given an empty table: every status exported, at 0
    await exporter.refresh()
    assert exported_leads(exporter.registry) == dict.fromkeys(LEAD_STATUSES, 0)

    # When leads are bulk inserted, upserted (ON CONFLICT DO UPDATE, as the importer merges),
    # updated and deleted
    await pool.execute(
        """INSERT INTO leads (email, status)
           SELECT 'lead' || g || '@example.com',
                  (ARRAY['active', 'active', 'unsubscribed', 'bounced', 'complained'])[1 + g % 5]
           FROM generate_series(1, 5000) g""")
    await pool.execute(
        """INSERT INTO leads (email, status)
           SELECT 'LEAD' || g || '@example.com', 'bounced' FROM generate_series(4900, 5200) g
           ON CONFLICT (lower(email)) DO UPDATE SET status = excluded.status""")
    await pool.execute("UPDATE leads SET status = 'unsubscribed' WHERE id % 7 = 0 AND status = 'active'")
    await pool.execute("DELETE FROM leads WHERE id % 11 = 0")
    await exporter.refresh()

    # Then each status equals count(*) on leads
    truth = await lead_truth(pool)
    assert sum(truth.values()) == 5200 - len([i for i in range(1, 5201) if i % 11 == 0])
    assert exported_leads(exporter.registry) == truth

    # And TRUNCATE (what an operator's reset does) brings every status back to 0
    await pool.execute("TRUNCATE leads CASCADE")
    await exporter.refresh()
    assert exported_leads(exporter.registry) == dict.fromkeys(LEAD_STATUSES, 0)


async def test_lead_delta_rows_are_compacted_without_changing_counts(exporter, pool):
    # Given more single-row statements than the compaction threshold
    for i in range(LEAD_DELTA_COMPACT_AT + 10):
        await pool.execute("INSERT INTO leads (email, status) VALUES ($1, $2)",
                           f"c{i}@example.com", "active" if i % 3 else "bounced")
    assert await pool.fetchval("SELECT count(*) FROM exporter_lead_counts") > LEAD_DELTA_COMPACT_AT
    # When the exporter refreshes (it compacts), then refreshes again
    await exporter.refresh()
    assert await pool.fetchval("SELECT count(*) FROM exporter_lead_counts") <= len(LEAD_STATUSES)
    await pool.execute("UPDATE leads SET status = 'complained' WHERE email = 'c1@example.com'")
    await exporter.refresh()
    # Then the counts are still exact
    assert exported_leads(exporter.registry) == await lead_truth(pool)


async def insert_campaign(pool, status: str, created_at: dt.datetime, **counters) -> int:
    cols = ", ".join(["name", "subject", "from_email", "status", "created_at", *counters])
    params = ", ".join(f"${i}" for i in range(1, 6 + len(counters)))
    return await pool.fetchval(
        f"INSERT INTO campaigns ({cols}) VALUES ({params}) RETURNING id",
        f"c-{status}", "subject", "news@example.com", status, created_at, *counters.values())


async def test_campaign_gauges_and_bounded_campaign_messages(aiohttp_client, exporter_settings, pool):
    from prometheus_client import CollectorRegistry

    from exporter import keys as ek
    from exporter.app import create_app

    # Given a limit of 3 campaigns with per-campaign series
    registry = CollectorRegistry()
    app = create_app(exporter_settings.replace(exporter=exporter_settings.exporter.replace(campaign_limit=3)),
                     registry=registry)
    await aiohttp_client(app)
    now = dt.datetime.now(dt.UTC)
    # and 2 active campaigns (old), 4 finished ones (recent) and a draft (newest)
    sending = await insert_campaign(pool, "sending", now - dt.timedelta(days=9), recipients=1000,
                                    queued=1000, sent=600, delivered=580, bounced=12, opened=120,
                                    clicked=30, failed=3, complained=1)
    paused = await insert_campaign(pool, "paused", now - dt.timedelta(days=8), recipients=50, queued=50, sent=10)
    for d in range(4):
        await insert_campaign(pool, "sent", now - dt.timedelta(days=d + 1), recipients=10, sent=10, delivered=9)
    draft = await insert_campaign(pool, "draft", now)

    # When the exporter refreshes
    await app[ek.REFRESHER].refresh_once()

    # Then campaigns by status equal count(*) by status, every status present
    truth = {r["status"]: r["n"] for r in await pool.fetch("SELECT status, count(*) AS n FROM campaigns GROUP BY status")}
    for status in ("draft", "queued", "sending", "paused", "sent", "failed", "cancelled"):
        assert registry.get_sample_value(m.CAMPAIGNS, {"status": status}) == truth.get(status, 0)
    # And the per-campaign series cover the active campaigns first, then the newest, 3 in all
    exported = {s.labels["campaign"] for metric in registry.collect() if metric.name == m.CAMPAIGN_MESSAGES
                for s in metric.samples}
    assert exported == {str(sending), str(paused), str(draft)}
    row = await pool.fetchrow("SELECT * FROM campaigns WHERE id = $1", sending)
    for col in ("recipients", "queued", "sent", "delivered", "bounced", "complained", "opened", "clicked", "failed"):
        assert registry.get_sample_value(m.CAMPAIGN_MESSAGES, {"campaign": str(sending), "status": col}) == row[col]


async def test_import_ratios_equal_ground_truth(exporter, pool):
    # Given imports finished in the window (and one older, outside it) and one running
    rows = [("completed", 1000, 10), ("completed", 500, 50), ("failed", 200, 0), ("cancelled", 100, 5),
            ("running", 40, 1)]
    for status, processed, invalid in rows:
        await pool.execute(
            "INSERT INTO imports (filename, status, processed_rows, invalid) VALUES ('f.csv', $1, $2, $3)",
            status, processed, invalid)
    await pool.execute(
        """INSERT INTO imports (filename, status, processed_rows, invalid, created_at)
           VALUES ('old.csv', 'failed', 999, 999, now() - interval '3 days')""")
    await exporter.refresh()
    reg = exporter.registry
    # Then success = completed / (completed + failed) and validation errors = invalid / processed
    assert reg.get_sample_value("mailgenius_import_success_ratio") == pytest.approx(2 / 3)
    assert reg.get_sample_value("mailgenius_import_validation_error_ratio") == pytest.approx(65 / 1800)
    assert reg.get_sample_value("mailgenius_imports", {"status": "running"}) == 1
    assert reg.get_sample_value("mailgenius_imports", {"status": "failed"}) == 1


async def test_queue_depths_equal_messages_enqueued_while_no_worker_runs(exporter, broker, make_key):
    # Given no worker, real dramatiq messages enqueued on both queues (some delayed)
    for i in range(7):
        enqueue(broker, m.QUEUE_EMAIL, "send_email", i)
    for i in range(3):
        enqueue(broker, m.QUEUE_EMAIL, "send_email", i, delay_ms=3_600_000)
    for i in range(4):
        enqueue(broker, m.QUEUE_IMPORT, "run_import", i)
    time.sleep(0.05)
    # When the exporter refreshes
    await exporter.refresh()
    reg = exporter.registry

    def depth(q, state):
        return reg.get_sample_value(m.QUEUE_MESSAGES, {"queue": q, "state": state})

    # Then waiting / delayed / dead equal what was enqueued
    assert (depth(m.QUEUE_EMAIL, "waiting"), depth(m.QUEUE_EMAIL, "delayed"), depth(m.QUEUE_EMAIL, "dead")) == (7, 3, 0)
    assert (depth(m.QUEUE_IMPORT, "waiting"), depth(m.QUEUE_IMPORT, "delayed")) == (4, 0)
    # And the oldest message's age is measured from its enqueue time
    age = reg.get_sample_value(m.QUEUE_OLDEST_AGE, {"queue": m.QUEUE_EMAIL})
    assert 0.04 <= age < 30
    # And /api/queue/status (read live) agrees
    resp = await exporter.get("/api/queue/status", headers=bearer(await make_key("read")))
    body = await resp.json()
    assert body["queues"][m.QUEUE_EMAIL]["waiting"] == 7
    assert body["queues"][m.QUEUE_IMPORT]["waiting"] == 4
    assert body["broker"] == "redis"


WORKER_SCRIPT = r"""
import os, sys, time, signal
import dramatiq
from dramatiq import Worker
from mailgenius.settings import load_settings
from mailgenius.broker import build_broker
from mailgenius.queues import WorkerHeartbeat

settings = load_settings()
broker = build_broker(settings)
broker.add_middleware(WorkerHeartbeat(redis_url=settings.redis_url, prefix=settings.redis_prefix, interval=0.2))
dramatiq.set_broker(broker)

@dramatiq.actor(queue_name="email-sending", actor_name="noop_exporter_test")
def noop():
    pass

worker = Worker(broker, queues={"email-sending"}, worker_threads=1, worker_timeout=100)
worker.start()
print("started", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.slow
async def test_worker_count_follows_heartbeats_and_drops_when_they_stop(aiohttp_client, exporter_settings, pool, tmp_path):
    import os
    import signal

    from prometheus_client import CollectorRegistry

    from exporter import keys as ek
    from exporter.app import create_app

    settings = exporter_settings.replace(exporter=exporter_settings.exporter.replace(worker_stale_seconds=1.5))
    registry = CollectorRegistry()
    app = create_app(settings, registry=registry)
    await aiohttp_client(app)

    async def workers():
        await app[ek.REFRESHER].refresh_once()
        return registry.get_sample_value(m.WORKERS, {"queue": m.QUEUE_EMAIL})

    assert await workers() == 0
    # Given two real dramatiq worker processes heartbeating on email-sending
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "BROKER_URL": settings.broker_url, "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix}
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 10
        while await workers() != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert await workers() == 2
        assert registry.get_sample_value(m.WORKERS, {"queue": m.QUEUE_IMPORT}) == 0

        # When one is killed (no clean shutdown: its heartbeats just stop)
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(5)
        # Then it still counts while its last beat is fresh, and is gone once it is stale
        assert await workers() == 2
        deadline = time.monotonic() + 5
        while await workers() != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert await workers() == 1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
            p.stdout.close()


async def test_a_failing_collector_is_counted_and_the_others_still_answer(aiohttp_client, exporter_settings, pool):
    from prometheus_client import CollectorRegistry

    from exporter import keys as ek
    from exporter.app import create_app

    # Given an exporter whose Redis (queues, workers) is down while Postgres is up
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    registry = CollectorRegistry()
    app = create_app(exporter_settings.replace(redis_url=dead_redis, broker_url=dead_redis), registry=registry)
    client = await aiohttp_client(app)
    await pool.execute("INSERT INTO leads (email) VALUES ('a@example.com'), ('b@example.com')")

    # When it refreshes twice and is scraped
    await app[ek.REFRESHER].refresh_once()
    await app[ek.REFRESHER].refresh_once()
    resp = await client.get("/metrics")

    # Then the scrape succeeds, the lead count is there, the queue series are not
    assert resp.status == 200
    text = await resp.text()
    assert registry.get_sample_value(m.LEADS, {"status": "active"}) == 2
    assert f"{m.QUEUE_MESSAGES}{{" not in text
    # And the failure is visible: collector down, errors counted, the others up
    assert registry.get_sample_value(COLLECTOR_UP, {"collector": "queues"}) == 0
    assert registry.get_sample_value(COLLECTOR_UP, {"collector": "workers"}) == 0
    # (the background task refreshes too: at least our two)
    assert registry.get_sample_value(COLLECT_ERRORS, {"collector": "queues"}) >= 2
    assert registry.get_sample_value(COLLECTOR_UP, {"collector": "leads"}) == 1
    assert registry.get_sample_value(SNAPSHOT_AGE, {"collector": "queues"}) == -1
    assert registry.get_sample_value(m.EXPORTER_COLLECT_DURATION, {"collector": "leads"}) > 0


async def test_metrics_pass_promtool_check_metrics(exporter, pool, broker):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    # Given data in every collector
    await pool.execute("INSERT INTO leads (email, status) VALUES ('x@example.com', 'active'), ('y@example.com', 'bounced')")
    await insert_campaign(pool, "sending", dt.datetime.now(dt.UTC), recipients=3, sent=2)
    enqueue(broker, m.QUEUE_EMAIL, "send_email", 1)
    await pool.execute(
        """INSERT INTO incidents (fingerprint, alertname, severity, status, started_at, resolved_at)
           VALUES ('f1', 'HighAPILatency', 'warning', 'resolved', now() - interval '1 hour', now()),
                  ('f2', 'QueueDepthHigh', 'critical', 'open', now() - interval '5 minutes', NULL)""")
    await exporter.refresh()
    # When /metrics is scraped
    resp = await exporter.get("/metrics")
    text = await resp.read()
    assert b"mailgenius_incident_mttr_seconds 3600" in text
    # Then promtool finds nothing to complain about
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    assert out.stdout.strip() == b"" and out.stderr.strip() == b"", (out.stdout + out.stderr).decode()


async def test_a_snapshot_too_old_is_not_exported_but_its_age_is(aiohttp_client, exporter_settings, pool):
    from prometheus_client import CollectorRegistry

    from exporter import keys as ek
    from exporter.app import create_app

    # Given snapshots that expire after 0.3 s and no background refresh in between
    registry = CollectorRegistry()
    app = create_app(exporter_settings.replace(exporter=exporter_settings.exporter.replace(max_snapshot_age=0.3,
                                                                                           refresh_seconds=600.0)),
                     registry=registry)
    await aiohttp_client(app)
    await app[ek.REFRESHER].refresh_once()
    assert registry.get_sample_value(m.LEADS, {"status": "active"}) == 0
    # When it gets older than that
    time.sleep(0.4)
    # Then its values disappear (stale numbers must not look live) and its age tells why
    assert registry.get_sample_value(m.LEADS, {"status": "active"}) is None
    assert registry.get_sample_value(SNAPSHOT_AGE, {"collector": "leads"}) >= 0.4
    assert registry.get_sample_value(COLLECTOR_UP, {"collector": "leads"}) == 1


async def test_served_metrics_equal_the_registry_and_follow_refreshes(exporter, pool):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> dict:
        # ages change between two renders, and the HTTP series count the scrapes themselves
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                if f.name != SNAPSHOT_AGE and not f.name.startswith("mailgenius_http_") for s in f.samples}

    await pool.execute("INSERT INTO leads (email) VALUES ('a@example.com')")
    await exporter.refresh()
    # Given the cached rendering served on /metrics
    served = samples(await (await exporter.get("/metrics")).text())
    # Then it holds exactly what the registry's collectors yield
    assert served == samples(generate_latest(exporter.registry).decode())
    assert served[(m.LEADS, (("status", "active"),))] == 1
    # And a new snapshot replaces the cached text
    await pool.execute("INSERT INTO leads (email) VALUES ('b@example.com')")
    await exporter.refresh()
    served = samples(await (await exporter.get("/metrics")).text())
    assert served[(m.LEADS, (("status", "active"),))] == 2


async def test_a_refresh_stuck_past_its_deadline_reports_down_without_waiting_for_it(monkeypatch):
    """A source whose query hangs and whose cancellation hangs too (an asyncpg query on a
    blackholed socket): the refresh reports up=0 at its deadline, the late task is not awaited,
    and the next round waits on that same task instead of starting another query."""
    import asyncio
    import types

    from exporter import collectors

    monkeypatch.setattr(collectors, "REFRESH_TIMEOUT", 0.3)
    started = 0
    release = asyncio.Event()

    class Stuck(collectors.Source):
        name = "stuck"

        async def refresh(self, ctx):
            nonlocal started
            started += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await release.wait()  # cancellation that does not finish until the socket dies
                raise

        def families(self, data):
            return []

    ctx = types.SimpleNamespace(config=types.SimpleNamespace(refresh_seconds=0.1))
    refresher = collectors.Refresher(ctx, [Stuck()])
    # When a round runs, Then it ends at the deadline with the collector down and the error counted
    t0 = time.monotonic()
    await refresher.refresh_once()
    assert time.monotonic() - t0 < 1.0
    st = refresher.states["stuck"]
    assert st.up is False and st.errors == 1 and "TimeoutError" in st.last_error
    # And the next round does not pile a second query on top of the stuck one
    await refresher.refresh_once()
    assert started == 1 and refresher.states["stuck"].errors == 2
    release.set()
    await refresher.stop()
