"""Business, queue, worker and incident collectors, at constant scrape cost.

How a scrape stays cheap
------------------------
prometheus_client calls ``collect()`` synchronously (the kernel runs ``generate_latest`` in an
executor thread), so no collector touches Postgres, Redis or the broker while a scrape waits.
Instead a :class:`Refresher` task on the service's event loop refreshes one *snapshot* per source
every ``refresh_seconds`` (5 s), with cheap queries only:

* leads by status: the few delta rows of ``exporter_lead_counts`` (triggers keep them exact,
  migration 0300), never ``count(*)`` on ``leads``;
* campaigns: ``campaigns`` is small (one row per campaign) and already carries the message
  counters the sender keeps exact, so ``messages`` (10,000,000+ rows) is never read;
* queues: a handful of O(1) Redis commands per queue (LLEN, ZCARD, LINDEX), or passive
  ``queue.declare`` on RabbitMQ;
* incidents and imports: small tables, through their status / time indexes.

The latest snapshots become *fresh* metric families (no stale label values survive), formatted
once per refresh: ``/metrics`` serves those cached bytes plus the few per-scrape series (HTTP
metrics, snapshot ages), so a scrape costs the same with an empty database and with 2,000,000
leads and 10,000,000 messages (benchmarks/exporter_scrape.py). ``collect()`` still yields the same
families for any other reader of the registry.

Failure policy (the choice, documented)
----------------------------------------
One failing source must not blank the whole page: the operator still wants queue depths while
Postgres is down. So:

* a refresh that raises or times out is logged (one warning line with the error), counted in
  ``mailgenius_exporter_collect_errors_total{collector}``, and flips
  ``mailgenius_exporter_collector_up{collector}`` to 0; the last good snapshot is kept and
  ``mailgenius_exporter_snapshot_age_seconds{collector}`` keeps growing;
* a snapshot older than ``max_snapshot_age`` (60 s) is no longer exported at all — stale numbers
  must not look live — and alerts can key on ``collector_up == 0`` or on the age;
* an exception while building one collector's families is logged and counted the same way and
  only that collector's families are left out; every other collector answers.

So the page is partial but never *silently* partial: the meta series say which part is missing.
Each collector times itself: ``mailgenius_exporter_collect_duration_seconds{collector}`` is the
wall time of its last refresh (the only place where it does real work).

Lines emitted (example)::

    mailgenius_leads{status="active"} 1780000.0
    mailgenius_campaigns{status="sending"} 2.0
    mailgenius_campaign_messages{campaign="42",status="delivered"} 9810.0
    mailgenius_queue_messages{queue="email-sending",state="waiting"} 250.0
    mailgenius_queue_oldest_message_age_seconds{queue="email-sending"} 3.2
    mailgenius_workers{queue="email-sending"} 2.0
    mailgenius_incidents_open{severity="critical"} 1.0
    mailgenius_incident_mttr_seconds 420.0
    mailgenius_incident_mtbf_seconds 86400.0
    mailgenius_import_success_ratio 0.98
    mailgenius_import_validation_error_ratio 0.018
    mailgenius_imports{status="running"} 1.0
    mailgenius_exporter_collect_duration_seconds{collector="leads"} 0.0012
    mailgenius_exporter_snapshot_age_seconds{collector="leads"} 1.9
    mailgenius_exporter_collector_up{collector="leads"} 1.0
    mailgenius_exporter_collect_errors_total{collector="leads"} 0.0
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mailgenius import import_states
from mailgenius import metrics as m
from mailgenius.health import consume_outcome
from mailgenius.import_states import sql_list
from mailgenius.queues import worker_count
from mailgenius.settings import ExporterSettings

from .brokers import queue_stats

log = logging.getLogger(__name__)

IMPORT_SUCCESS_RATIO = m.IMPORT_SUCCESS_RATIO
IMPORT_VALIDATION_ERROR_RATIO = m.IMPORT_VALIDATION_ERROR_RATIO
IMPORTS = m.IMPORTS
SNAPSHOT_AGE = m.EXPORTER_SNAPSHOT_AGE
COLLECTOR_UP = m.EXPORTER_COLLECTOR_UP
COLLECT_ERRORS = m.EXPORTER_COLLECT_ERRORS

#: label values pre-initialised so a series exists (at 0) before the first row of its kind
LEAD_STATUSES = ("active", "unsubscribed", "bounced", "complained")
CAMPAIGN_STATUSES = ("draft", "queued", "sending", "paused", "sent", "failed", "cancelled")
#: the counter columns of ``campaigns`` exported per campaign
CAMPAIGN_COUNTERS = ("recipients", "queued", "sent", "delivered", "bounced", "complained",
                     "opened", "clicked", "failed")
ACTIVE_CAMPAIGN_STATUSES = ("queued", "sending", "paused")
SEVERITIES = ("critical", "warning", "info")
QUEUE_STATES = ("waiting", "delayed", "dead")
#: the importer's words (mailgenius/import_states.py: services never import each other)
IMPORT_STATUSES = import_states.STATUSES
#: fold the lead delta rows into one row per status once there are more than this many
LEAD_DELTA_COMPACT_AT = 64


@dataclass
class Context:
    """What a source may use while refreshing (never while collecting)."""

    settings: Any
    config: ExporterSettings
    get_pool: Callable[[], Any]
    get_redis: Callable[[], Any]


class Source:
    """One collector: ``refresh`` (async, background) reads, ``families`` (sync, per scrape)
    turns the snapshot into fresh metric families."""

    name = "source"

    async def refresh(self, ctx: Context) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def families(self, data: Any) -> Iterable:  # pragma: no cover - abstract
        raise NotImplementedError


# -- the sources ---------------------------------------------------------------------------------

class LeadCounts(Source):
    """``mailgenius_leads{status}`` from the trigger-kept delta rows (migration 0300)."""

    name = "leads"

    async def refresh(self, ctx: Context) -> dict[str, int]:
        pool = ctx.get_pool()
        rows = await pool.fetch(
            "SELECT status, sum(delta)::bigint AS n, count(*) AS parts FROM exporter_lead_counts GROUP BY status"
        )
        if sum(r["parts"] for r in rows) > LEAD_DELTA_COMPACT_AT:
            await self.compact(pool)
        return {r["status"]: int(r["n"]) for r in rows}

    @staticmethod
    async def compact(pool) -> None:
        """Replace the delta rows by one row per status, in one statement (exact under
        concurrent writers: rows committed after our snapshot are simply left for next time)."""
        await pool.execute(
            """WITH gone AS (DELETE FROM exporter_lead_counts RETURNING status, delta)
               INSERT INTO exporter_lead_counts (status, delta)
               SELECT status, sum(delta) FROM gone GROUP BY status HAVING sum(delta) <> 0"""
        )

    def families(self, data):
        g = GaugeMetricFamily(m.LEADS, "Leads (contacts) by status.", labels=["status"])
        for status in sorted(set(LEAD_STATUSES) | set(data)):
            g.add_metric([status], data.get(status, 0))
        yield g


class CampaignCounts(Source):
    """``mailgenius_campaigns{status}``: campaigns per status (a small table)."""

    name = "campaigns"

    async def refresh(self, ctx: Context) -> dict[str, int]:
        rows = await ctx.get_pool().fetch("SELECT status, count(*) AS n FROM campaigns GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    def families(self, data):
        g = GaugeMetricFamily(m.CAMPAIGNS, "Campaigns by status.", labels=["status"])
        for status in sorted(set(CAMPAIGN_STATUSES) | set(data)):
            g.add_metric([status], data.get(status, 0))
        yield g


class CampaignMessages(Source):
    """``mailgenius_campaign_messages{campaign, status}`` for at most ``campaign_limit``
    campaigns: the active ones (queued, sending, paused) first, then the most recent. Values are
    the sender's exact counters on ``campaigns``; ``messages`` is never read."""

    name = "campaign_messages"

    async def refresh(self, ctx: Context) -> list[dict]:
        cols = ", ".join(CAMPAIGN_COUNTERS)
        rows = await ctx.get_pool().fetch(
            f"""SELECT id, {cols}, status IN ('queued', 'sending', 'paused') AS active FROM (
                    (SELECT * FROM campaigns WHERE status IN ('queued', 'sending', 'paused')
                      ORDER BY created_at DESC LIMIT $1)
                    UNION
                    (SELECT * FROM campaigns ORDER BY created_at DESC LIMIT $1)
                ) c
                ORDER BY active DESC, created_at DESC, id DESC
                LIMIT $1""",
            ctx.config.campaign_limit,
        )
        return [dict(r) for r in rows]

    def families(self, data):
        g = GaugeMetricFamily(
            m.CAMPAIGN_MESSAGES,
            "Messages of recent or active campaigns by counter (recipients, queued, sent, delivered, ...).",
            labels=["campaign", "status"],
        )
        for row in data:
            for col in CAMPAIGN_COUNTERS:
                g.add_metric([str(row["id"]), col], row[col])
        yield g


class QueueDepths(Source):
    """``mailgenius_queue_messages{queue, state}`` and ``..._oldest_message_age_seconds{queue}``
    from the broker (dramatiq's Redis keys, or RabbitMQ). RabbitMQ does not tell the age of a
    queue's head without consuming it, so the age is not exported on RabbitMQ."""

    name = "queues"

    async def refresh(self, ctx: Context) -> dict[str, Any]:
        out = {}
        for queue in m.QUEUES:
            out[queue] = await queue_stats(ctx.settings, ctx.get_redis(), queue)
        return out

    def families(self, data):
        depth = GaugeMetricFamily(m.QUEUE_MESSAGES, "Messages in a dramatiq queue by state.",
                                  labels=["queue", "state"])
        age = GaugeMetricFamily(m.QUEUE_OLDEST_AGE,
                                "Age of the oldest waiting message of a queue (0 when empty).",
                                labels=["queue"])
        for queue, stats in sorted(data.items()):
            for state in QUEUE_STATES:
                depth.add_metric([queue, state], getattr(stats, state))
            if stats.oldest_age_seconds is not None:
                age.add_metric([queue], stats.oldest_age_seconds)
        yield depth
        yield age


class WorkerCounts(Source):
    """``mailgenius_workers{queue}``: worker processes whose heartbeat is fresh."""

    name = "workers"

    async def refresh(self, ctx: Context) -> dict[str, int]:
        redis = ctx.get_redis()
        return {
            q: await worker_count(redis, ctx.settings.redis_prefix, q,
                                  stale_after=ctx.config.worker_stale_seconds)
            for q in m.QUEUES
        }

    def families(self, data):
        g = GaugeMetricFamily(m.WORKERS, "Live worker processes consuming a queue (by heartbeat).",
                              labels=["queue"])
        for queue, n in sorted(data.items()):
            g.add_metric([queue], n)
        yield g


@dataclass
class IncidentStats:
    open_by_severity: dict[str, int] = field(default_factory=dict)
    mttr_seconds: float | None = None
    mtbf_seconds: float | None = None


async def incident_stats(pool, window_days: float) -> IncidentStats:
    """Open incidents by severity; MTTR = mean (resolved_at - started_at) of incidents resolved
    and started in the window; MTBF = mean time between the starts of consecutive incidents in
    the window ((last start - first start) / (n - 1)); None when undefined."""
    open_rows = await pool.fetch(
        "SELECT severity, count(*) AS n FROM incidents WHERE status = 'open' GROUP BY severity"
    )
    row = await pool.fetchrow(
        """SELECT avg(extract(epoch FROM resolved_at - started_at))
                      FILTER (WHERE status = 'resolved' AND resolved_at IS NOT NULL) AS mttr,
                  count(*) AS n,
                  extract(epoch FROM max(started_at) - min(started_at)) AS span
             FROM incidents
            WHERE started_at >= now() - make_interval(secs => $1)""",
        window_days * 86400.0,
    )
    mtbf = float(row["span"]) / (row["n"] - 1) if row["n"] and row["n"] > 1 else None
    return IncidentStats(
        {r["severity"]: int(r["n"]) for r in open_rows},
        float(row["mttr"]) if row["mttr"] is not None else None,
        mtbf,
    )


class Incidents(Source):
    """``mailgenius_incidents_open{severity}``, ``mailgenius_incident_mttr_seconds`` and
    ``mailgenius_incident_mtbf_seconds`` (absent until defined: no resolved incident / fewer
    than two incidents in the window)."""

    name = "incidents"

    async def refresh(self, ctx: Context) -> IncidentStats:
        return await incident_stats(ctx.get_pool(), ctx.config.incident_window_days)

    def families(self, data: IncidentStats):
        g = GaugeMetricFamily(m.INCIDENTS_OPEN, "Open incidents (firing alerts) by severity.",
                              labels=["severity"])
        for sev in sorted(set(SEVERITIES) | set(data.open_by_severity)):
            g.add_metric([sev], data.open_by_severity.get(sev, 0))
        yield g
        mttr = GaugeMetricFamily(m.INCIDENT_MTTR, "Mean time to resolve incidents (30-day window).")
        if data.mttr_seconds is not None:
            mttr.add_metric([], data.mttr_seconds)
        yield mttr
        mtbf = GaugeMetricFamily(m.INCIDENT_MTBF, "Mean time between incident starts (30-day window).")
        if data.mtbf_seconds is not None:
            mtbf.add_metric([], data.mtbf_seconds)
        yield mtbf


@dataclass
class ImportStats:
    by_status: dict[str, int] = field(default_factory=dict)
    success_ratio: float | None = None
    validation_error_ratio: float | None = None


async def import_stats(pool, window_hours: float) -> ImportStats:
    """Active imports by status; over imports finished in the window: success ratio =
    completed / (completed + failed) (cancelled ones are neither), validation-error ratio =
    invalid rows / processed rows."""
    active = await pool.fetch(
        f"SELECT status, count(*) AS n FROM imports WHERE status IN {sql_list(import_states.ACTIVE)} GROUP BY status"
    )
    done = await pool.fetch(
        f"""SELECT status, count(*) AS n, coalesce(sum(invalid), 0) AS invalid,
                   coalesce(sum(processed_rows), 0) AS processed
              FROM imports
             WHERE created_at >= now() - make_interval(secs => $1)
               AND status IN {sql_list(import_states.FINISHED)}
             GROUP BY status""",
        window_hours * 3600.0,
    )
    by_status = {r["status"]: int(r["n"]) for r in active}
    by_status.update({s: 0 for s in import_states.FINISHED})
    by_status.update({r["status"]: int(r["n"]) for r in done})
    invalid = sum(int(r["invalid"]) for r in done)
    processed = sum(int(r["processed"]) for r in done)
    completed, failed = by_status[import_states.COMPLETED], by_status[import_states.FAILED]
    return ImportStats(
        by_status,
        completed / (completed + failed) if completed + failed else None,
        invalid / processed if processed else None,
    )


class Imports(Source):
    """``mailgenius_imports{status}`` (queued and running now; completed, failed and cancelled in
    the rate window), ``mailgenius_import_success_ratio`` and
    ``mailgenius_import_validation_error_ratio`` over that window (absent with no data)."""

    name = "imports"

    async def refresh(self, ctx: Context) -> ImportStats:
        return await import_stats(ctx.get_pool(), ctx.config.rate_window_hours)

    def families(self, data: ImportStats):
        g = GaugeMetricFamily(IMPORTS, "Imports queued or running now; completed, failed or cancelled in the rate window (24 h).",
                              labels=["status"])
        for s in IMPORT_STATUSES:
            g.add_metric([s], data.by_status.get(s, 0))
        yield g
        ok = GaugeMetricFamily(IMPORT_SUCCESS_RATIO,
                               "Completed / (completed + failed) imports in the rate window (24 h).")
        if data.success_ratio is not None:
            ok.add_metric([], data.success_ratio)
        yield ok
        bad = GaugeMetricFamily(IMPORT_VALIDATION_ERROR_RATIO,
                                "Invalid rows / processed rows of imports finished in the rate window (24 h).")
        if data.validation_error_ratio is not None:
            bad.add_metric([], data.validation_error_ratio)
        yield bad


def default_sources() -> list[Source]:
    return [LeadCounts(), CampaignCounts(), CampaignMessages(), QueueDepths(), WorkerCounts(),
            Incidents(), Imports()]


# -- snapshots and the background refresh ----------------------------------------------------------

#: the longest a source's refresh may take (unless the refresh interval is longer), seconds: past
#: it the collector reports up=0 while scrapes keep answering from the last snapshot
REFRESH_TIMEOUT = 5.0


@dataclass
class SourceState:
    data: Any = None
    #: time.time() of the last successful refresh (0: never)
    taken_at: float = 0.0
    duration: float = 0.0
    up: bool = False
    errors: int = 0
    last_error: str = ""


class Refresher:
    """Refreshes every source's snapshot every ``config.refresh_seconds`` on the event loop."""

    def __init__(self, ctx: Context, sources: list[Source] | None = None):
        self.ctx = ctx
        self.sources = sources if sources is not None else default_sources()
        self.states: dict[str, SourceState] = {s.name: SourceState() for s in self.sources}
        self._lock = threading.Lock()  # errors are also counted from the scrape thread
        self._task: asyncio.Task | None = None
        #: source name -> its last refresh that outlived its deadline (cancelled, maybe still unwinding)
        self._inflight: dict[str, asyncio.Task] = {}

    def refresh_timeout(self) -> float:
        """Seconds a source's refresh may take before it counts as failed (collector_up 0)."""
        return max(self.ctx.config.refresh_seconds, REFRESH_TIMEOUT)

    def count_error(self, name: str, error: str) -> None:
        with self._lock:
            st = self.states[name]
            st.errors += 1
            st.last_error = error

    async def refresh_source(self, source: Source) -> None:
        """Refresh one source's snapshot, or mark it down (up=0, error counted) when the refresh
        fails or outlives :meth:`refresh_timeout`.

        The refresh runs as its own task and is *not* awaited past the deadline: cancelling a
        query stuck on a silent (blackholed) Postgres socket does not finish until the
        connection gives up, and ``asyncio.wait_for`` would wait for that (measured: ~35 s of
        collector_up 1 after Postgres went silent). A late task is cancelled and left to end in
        the background; while it has not ended, the next rounds wait on it instead of piling up
        new queries. Otherwise every call starts a fresh refresh (a caller that just changed the
        data, like a test, never gets a snapshot taken before its change).
        """
        start = time.perf_counter()
        timeout = self.refresh_timeout()
        task = self._inflight.get(source.name)
        if task is None or task.done():
            self._inflight.pop(source.name, None)
            task = asyncio.get_running_loop().create_task(source.refresh(self.ctx), name=f"refresh-{source.name}")
            task.add_done_callback(consume_outcome)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:  # the refresh loop is stopping: so does this refresh
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._inflight[source.name] = task
            err = f"TimeoutError: refresh took more than {timeout:g} s"
        elif task.cancelled():
            err = "CancelledError: refresh cancelled after its deadline"
        elif (exc := task.exception()) is not None:
            err = f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
        else:
            st = self.states[source.name]
            st.data, st.taken_at, st.up = task.result(), time.time(), True
            st.duration = time.perf_counter() - start
            return
        self.states[source.name].up = False
        self.states[source.name].duration = time.perf_counter() - start
        self.count_error(source.name, err)
        log.warning("collector refresh failed", extra={"collector": source.name, "error": err})

    async def refresh_once(self) -> None:
        await asyncio.gather(*(self.refresh_source(s) for s in self.sources))

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - refresh_source already contains errors
                log.exception("snapshot refresh failed")
            await asyncio.sleep(max(0.0, self.ctx.config.refresh_seconds - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="exporter-refresh")

    async def stop(self) -> None:
        pending = [t for t in self._inflight.values() if not t.done()]
        for task in pending:
            task.cancel()
        if pending:  # give them a moment to unwind; a stuck one is abandoned
            await asyncio.wait(pending, timeout=1.0)
        self._inflight.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class _Families:
    """A list of families with the ``collect()`` generate_latest expects."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


class SnapshotCollector(Collector):
    """The prometheus_client collector registered on the exporter's registry: reads snapshots
    only (see the module docstring for the failure policy).

    Two ways to read it. ``collect()`` is the ordinary collector protocol (tests use
    ``registry.get_sample_value``). ``render(registry)`` is what the exporter's ``/metrics`` serves
    (``mailgenius.keys.METRICS_RENDER``): the snapshot families are formatted once per refresh and
    the cached bytes are appended to the registry's other families (the HTTP metrics) and to the
    meta families (ages change every scrape), so a scrape costs the same whatever the data."""

    def __init__(self, refresher: Refresher):
        self.refresher = refresher
        self._local = threading.local()
        self._cache_lock = threading.Lock()
        self._cache_key: tuple | None = None
        self._cache: bytes = b""

    def describe(self):
        # no describe: the registry must not call collect() at registration (the snapshots are
        # empty then) and our families vary with the data
        return []

    def collect(self):
        if getattr(self._local, "suppress", False):
            return
        now = time.time()
        for source in self._fresh_sources(now):
            yield from self._families(source)
        yield from self._meta(now)

    def render(self, registry) -> bytes:
        from prometheus_client import generate_latest

        now = time.time()
        self._local.suppress = True
        try:
            head = generate_latest(registry)
        finally:
            self._local.suppress = False
        return head + self._data_text(now) + generate_latest(_Families(list(self._meta(now))))

    def _fresh_sources(self, now: float) -> list[Source]:
        max_age = self.refresher.ctx.config.max_snapshot_age
        out = []
        for source in self.refresher.sources:
            st = self.refresher.states[source.name]
            if st.taken_at and now - st.taken_at <= max_age:
                out.append(source)
        return out

    def _families(self, source: Source) -> list:
        st = self.refresher.states[source.name]
        try:
            return list(source.families(st.data))
        except Exception as exc:
            self.refresher.count_error(source.name, f"{type(exc).__name__}: {exc}"[:300])
            log.exception("collector failed while building its families", extra={"collector": source.name})
            return []

    def _data_text(self, now: float) -> bytes:
        from prometheus_client import generate_latest

        fresh = self._fresh_sources(now)
        key = tuple((s.name, self.refresher.states[s.name].taken_at) for s in fresh)
        with self._cache_lock:
            if key != self._cache_key:
                families = [f for s in fresh for f in self._families(s)]
                self._cache = generate_latest(_Families(families))
                self._cache_key = key
            return self._cache

    def _meta(self, now: float):
        duration = GaugeMetricFamily(
            m.EXPORTER_COLLECT_DURATION,
            "Wall time of the collector's last refresh (its only database / broker work).",
            labels=["collector"])
        age = GaugeMetricFamily(SNAPSHOT_AGE, "Age of the collector's last good snapshot (-1: none yet).",
                                labels=["collector"])
        up = GaugeMetricFamily(COLLECTOR_UP, "1 when the collector's last refresh succeeded.",
                               labels=["collector"])
        errors = CounterMetricFamily(COLLECT_ERRORS, "Collector refreshes or scrapes that failed.",
                                     labels=["collector"])
        for source in self.refresher.sources:
            st = self.refresher.states[source.name]
            duration.add_metric([source.name], st.duration)
            age.add_metric([source.name], now - st.taken_at if st.taken_at else -1.0)
            up.add_metric([source.name], 1.0 if st.up else 0.0)
            errors.add_metric([source.name], st.errors)
        yield from (duration, age, up, errors)
