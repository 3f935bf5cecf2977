"""The import job: read batches, COPY them into a staging table, merge into ``leads``, commit
each batch together with its checkpoint.

Exactly-once by construction: a batch's leads, its error rows, the import's counters and the
checkpoint (byte offset + line) are committed in one transaction. A worker killed with -9 loses
only the uncommitted batch; the redelivered message re-reads from the checkpoint, so the leads
table and the counts end identical to an uninterrupted run. A per-import advisory lock keeps two
deliveries of one message from running at once.

Duplicates within the file: the reader drops repeats inside one batch; across batches the
merge itself tells them apart, because a lead already carrying this ``import_id`` was written
by an earlier batch of this file (``import_skipped`` does the same for existing leads that a
skip-mode import left alone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from mailgenius import logs
from mailgenius.cache import rkey
from mailgenius.metrics import (
    IMPORT_DURATION,
    IMPORT_JOBS,
    IMPORT_ROWS,
    IMPORT_VALIDATION_ERRORS,
    bare_name,
)

from . import jobs
from .jobs import CANCELLED, COMPLETED, FAILED, FINISHED, RUNNING
from .reader import (
    COPY_NULL,
    DEFAULT_MAX_LINE,
    DUPLICATE,
    REASONS,
    Batch,
    BatchReader,
    FileInfo,
    FileProblem,
    sniff,
)

log = logging.getLogger(__name__)

#: advisory-lock namespace of import jobs (first key of pg_try_advisory_lock(int, int))
LOCK_NAMESPACE = 0x494D50  # "IMP"
#: outcomes of mailgenius_import_rows_total
OUTCOMES = ("inserted", "updated", "duplicate", "invalid")
#: seconds between two progress publications / cancel-flag polls
POLL_INTERVAL = 0.25
#: work_mem of the import's session (the default 4 MB spills each batch's sort to disk)
WORK_MEM = "64MB"
#: columns of import_errors the loader writes
ERROR_COLUMNS = ["import_id", "line", "reason", "raw"]
#: seconds to wait for the second (staging) session from the pool before loading on one
STAGING_ACQUIRE_TIMEOUT = 2.0
#: seconds a live-progress record stays in Redis after its last update
PROGRESS_TTL = 3600


@dataclass(frozen=True)
class ImportOptions:
    #: rows per committed batch: larger is a little faster, smaller gives finer progress,
    #: cancel and resume granularity (MAILGENIUS_IMPORT_BATCH_ROWS)
    batch_rows: int = 25_000
    #: longest accepted field, characters (MAILGENIUS_IMPORT_MAX_FIELD)
    max_field: int = 4096
    #: longest physical line, bytes (MAILGENIUS_IMPORT_MAX_LINE_BYTES)
    max_line: int = DEFAULT_MAX_LINE
    #: test-only: seconds to sleep after each committed batch, to kill a worker mid-import
    #: (MAILGENIUS_IMPORT_BATCH_PAUSE_MS)
    batch_pause: float = 0.0

    @classmethod
    def from_settings(cls, settings) -> ImportOptions:
        """The options of ``settings.importer`` (validated by mailgenius.settings.load_settings)."""
        s = settings.importer
        return cls(batch_rows=s.batch_rows, max_field=s.max_field, max_line=s.max_line,
                   batch_pause=s.batch_pause)


class ImportMetrics:
    """The worker-side import metrics, on the registry passed in (the default one in workers,
    where ``mailgenius worker`` sets up multiprocess mode)."""

    #: import durations run from a second (small files) to an hour (huge ones)
    DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = REGISTRY if registry is None else registry
        self.rows = Counter(bare_name(IMPORT_ROWS, "_total"), "Import rows by outcome.", ["outcome"], registry=registry)
        self.validation_errors = Counter(
            bare_name(IMPORT_VALIDATION_ERRORS, "_total"), "Rows rejected or skipped by the importer, by reason.",
            ["reason"], registry=registry)
        self.jobs = Counter(bare_name(IMPORT_JOBS, "_total"), "Finished import jobs by status.", ["status"],
                            registry=registry)
        self.duration = Histogram(IMPORT_DURATION, "Wall time of finished import jobs.",
                                  buckets=self.DURATION_BUCKETS, registry=registry)
        for o in OUTCOMES:
            self.rows.labels(o)
        for r in REASONS:
            self.validation_errors.labels(r)
        for s in FINISHED:
            self.jobs.labels(s)


class Cancelled(Exception):
    """The import's cancel flag was seen: the current batch is rolled back."""


_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS import_stage (
    -- the lead's id, drawn while staging: the skip-mode merge tells inserted rows from missed
    -- ones by this bigint instead of by the address text
    id bigint NOT NULL DEFAULT nextval('leads_id_seq'),
    line bigint, email text, first_name text, last_name text, company text, phone text,
    tags text[] NOT NULL, source text, attributes jsonb
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS import_missed (line bigint, k text) ON COMMIT DELETE ROWS;
"""

_INSERT = """
INSERT INTO leads AS l (id, email, first_name, last_name, company, phone, tags, attributes, source, import_id)
-- the reader staged the values trimmed, empty ones as NULL
SELECT s.id, s.email, s.first_name, s.last_name, s.company, s.phone, s.tags,
       COALESCE(s.attributes, '{}'::jsonb), COALESCE(s.source, $2), $1
FROM import_stage s
-- one lock order for every import: concurrent imports of overlapping files never deadlock
ORDER BY lower(s.email)
"""

MERGE_SKIP = """
WITH ins AS (
    {insert}
    ON CONFLICT ((lower(email))) DO NOTHING
    -- an inserted lead carries its staged id: the missed rows are the staged ids not returned
    RETURNING l.id
), miss AS (
    INSERT INTO import_missed (line, k)
    SELECT s.line, lower(s.email) FROM import_stage s
    WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.id = s.id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ins) AS inserted, 0::bigint AS updated, (SELECT count(*) FROM miss) AS missed
"""

MERGE_UPDATE = """
WITH up AS (
    {insert}
    ON CONFLICT ((lower(email))) DO UPDATE SET
        first_name = COALESCE(EXCLUDED.first_name, l.first_name),
        last_name = COALESCE(EXCLUDED.last_name, l.last_name),
        company = COALESCE(EXCLUDED.company, l.company),
        phone = COALESCE(EXCLUDED.phone, l.phone),
        tags = CASE WHEN EXCLUDED.tags <@ l.tags THEN l.tags
                    ELSE ARRAY(SELECT DISTINCT t FROM unnest(l.tags || EXCLUDED.tags) t ORDER BY 1) END,
        attributes = l.attributes || EXCLUDED.attributes,
        source = COALESCE(EXCLUDED.source, l.source),
        import_id = EXCLUDED.import_id,
        updated_at = now()
    -- a lead this import already wrote comes from an earlier row of the same file
    WHERE l.import_id IS DISTINCT FROM EXCLUDED.import_id
    RETURNING lower(l.email) AS k, (l.xmax = 0) AS fresh
), miss AS (
    INSERT INTO import_missed (line, k)
    SELECT s.line, lower(s.email) FROM import_stage s
    WHERE NOT EXISTS (SELECT 1 FROM up WHERE up.k = lower(s.email))
    RETURNING 1
)
SELECT count(*) FILTER (WHERE fresh) AS inserted, count(*) FILTER (WHERE NOT fresh) AS updated,
       (SELECT count(*) FROM miss) AS missed
FROM up
"""

#: skip mode: which missed rows repeat an earlier row of the file, which met an existing lead
CLASSIFY_SKIP = """
WITH cls AS (
    SELECT m.line, m.k,
           (COALESCE(l.import_id = $1, false) OR sk.email_key IS NOT NULL) AS dup
    FROM import_missed m
    LEFT JOIN leads l ON lower(l.email) = m.k
    LEFT JOIN import_skipped sk ON sk.import_id = $1 AND sk.email_key = m.k
), remember AS (
    INSERT INTO import_skipped (import_id, email_key)
    SELECT $1, k FROM cls WHERE NOT dup
    ON CONFLICT DO NOTHING
)
SELECT line FROM cls WHERE dup ORDER BY line
"""

CHECKPOINT = """
UPDATE imports SET
    processed_rows = processed_rows + $2, inserted = inserted + $3, updated = updated + $4,
    duplicates = duplicates + $5, invalid = invalid + $6, skipped_existing = skipped_existing + $7,
    checkpoint_offset = $8, checkpoint_row = $9, updated_at = now()
WHERE id = $1
RETURNING cancel_requested
"""


@dataclass
class BatchResult:
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    duplicates: int = 0
    invalid: int = 0
    skipped: int = 0
    reasons: dict | None = None


def progress_key(settings, import_id: int) -> str:
    return rkey(settings, "import", str(import_id), "progress")


class ImportJob:
    """One run (first or resumed) of one import."""

    def __init__(self, pool: asyncpg.Pool, redis, settings, import_id: int, *,
                 metrics: ImportMetrics, options: ImportOptions | None = None):
        self.pool = pool
        self.redis = redis
        self.settings = settings
        self.import_id = import_id
        self.metrics = metrics
        self.options = options or ImportOptions.from_settings(settings)
        self.cancel = asyncio.Event()
        self.stop_watch = asyncio.Event()
        self.committed_rows = 0
        self.inflight_rows = 0
        self.job_pid = 0
        self.job_pids: list[int] = []
        self._merged_at = 0.0  #: when the last batch committed (perf_counter)
        #: seconds spent per stage of this run (logged when the load ends): where an import's
        #: time goes, to measure rather than guess
        self.stages: dict[str, float] = {}

    # -- entry point -------------------------------------------------------------------------

    async def run(self) -> str:
        """Run (or resume) the import; return its status afterwards. File problems end the job
        as ``failed``; unexpected errors propagate (the actor retries, resuming)."""
        with logs.bound(import_id=self.import_id):
            async with self.pool.acquire() as conn:
                locked = await conn.fetchval("SELECT pg_try_advisory_lock($1, $2::int)",
                                             LOCK_NAMESPACE, self.import_id)
                if not locked:
                    log.warning("import already running elsewhere; this delivery does nothing")
                    return RUNNING
                try:
                    return await self._run_locked(conn)
                finally:
                    try:
                        await conn.execute("SELECT pg_advisory_unlock($1, $2::int)",
                                           LOCK_NAMESPACE, self.import_id)
                    except Exception:  # a broken connection drops its locks anyway
                        pass

    async def _run_locked(self, conn: asyncpg.Connection) -> str:
        row = await conn.fetchrow("SELECT * FROM imports WHERE id = $1", self.import_id)
        if row is None:
            log.warning("import not found; message dropped")
            return "missing"
        if row["status"] in FINISHED:
            return row["status"]
        if row["cancel_requested"]:
            await self._finish(conn, CANCELLED, None)
            return CANCELLED
        row = await jobs.claim(conn, self.import_id)
        if row is None:  # cancelled (or finished) between the read above and now
            return await jobs.status_of(conn, self.import_id)
        resumed = row["checkpoint_offset"] > 0
        log.info("import resumed from checkpoint" if resumed else "import started",
                 extra={"checkpoint_row": row["checkpoint_row"], "attempt": row["attempts"]})
        loop = asyncio.get_running_loop()
        try:
            if not row["path"] or not os.path.exists(row["path"]):
                raise FileProblem("the uploaded file is no longer on disk; upload it again")
            override = json.loads(row["columns"]) if row["columns"] else None
            info: FileInfo = await loop.run_in_executor(
                None, lambda: sniff(row["path"], override, max_line=self.options.max_line))
        except FileProblem as exc:
            await self._finish(conn, FAILED, str(exc))
            return FAILED
        if not resumed:
            await conn.execute(
                """UPDATE imports SET encoding = $2, delimiter = $3, total_rows = $4, mapping = $5::jsonb,
                       updated_at = now() WHERE id = $1""",
                self.import_id, info.encoding, info.delimiter, info.est_rows, json.dumps(info.mapping.describe()))
        reader = BatchReader(
            info,
            offset=row["checkpoint_offset"] if resumed else None,
            line=row["checkpoint_row"] if resumed else None,
            batch_rows=self.options.batch_rows,
            max_field=self.options.max_field,
            max_line=self.options.max_line,
            import_tags=row["tags"],
        )
        self.committed_rows = row["processed_rows"]
        self.job_pid = conn.get_server_pid()
        self.job_pids = [self.job_pid]  # + the staging session's, while the load runs
        watcher = asyncio.create_task(self._watch())
        cancelled = False
        try:
            await self._load(conn, row, info, reader)
        except Cancelled:
            cancelled = True
        except asyncpg.QueryCanceledError:
            if not self.cancel.is_set():
                raise
            cancelled = True  # the watcher interrupted the statement in flight
        finally:
            self.stop_watch.set()
            try:
                await asyncio.wait_for(asyncio.shield(watcher), 10)
            except Exception:
                log.warning("progress watcher did not stop", exc_info=True)
        if cancelled:  # only now: the watcher can no longer interrupt this statement
            await self._finish(conn, CANCELLED, None)
            return CANCELLED
        processed = await conn.fetchval("SELECT processed_rows FROM imports WHERE id = $1", self.import_id)
        if processed == 0:
            await self._finish(conn, FAILED, "the file has a header row but no data rows")
            return FAILED
        await self._finish(conn, COMPLETED, None)
        for p in {row["path"], info.data_path}:
            try:
                os.remove(p)
            except OSError:
                pass
        return COMPLETED

    # -- batches -----------------------------------------------------------------------------

    async def _load(self, conn, row, info: FileInfo, reader: BatchReader) -> None:
        # a second session stages batch n+1 (its COPY) while the first merges batch n; each
        # batch still commits whole, in file order (n+1 merges only after n committed). Without
        # a spare pooled connection the batches run one after the other on ``conn``.
        try:
            conn2 = await self.pool.acquire(timeout=STAGING_ACQUIRE_TIMEOUT)
        except TimeoutError:
            conn2 = None
        try:
            conns = [conn] if conn2 is None else [conn, conn2]
            for c in conns:
                await self._prepare_session(c)
            if conn2 is not None:
                self.job_pids.append(conn2.get_server_pid())
            await self._load_batches(conns, row, info, reader)
        finally:
            if conn2 is not None:
                self.job_pids[1:] = []
                await self.pool.release(conn2)

    async def _prepare_session(self, conn) -> None:
        await conn.execute(_STAGE_DDL)
        # a batch lost to a Postgres crash is lost together with its checkpoint (same
        # transaction), so the resumed job redoes it: no need to wait for each commit's fsync
        await conn.execute("SET synchronous_commit = off")
        # the merge sorts a batch by lower(email) (one lock order for every import): in memory,
        # not in temporary files (a 25,000-row batch spilled 4 MB at the default 4 MB)
        await conn.execute(f"SET work_mem = '{WORK_MEM}'")
        # JIT-compiling the merge of each batch costs more than it saves on a few thousand rows
        await conn.execute("SET jit = off")

    async def _load_batches(self, conns, row, info: FileInfo, reader: BatchReader) -> None:
        self.stage_columns = reader.stage_columns
        merge_sql = (MERGE_UPDATE if row["mode"] == "update" else MERGE_SKIP).format(insert=_INSERT)
        mode, source = row["mode"], row["source"]
        loop = asyncio.get_running_loop()
        gen = reader.batches()
        fd = os.open(info.data_path, os.O_RDONLY)
        enc = reader.text_encoding
        overlap = len(conns) > 1
        staged: asyncio.Future | None = None  # the next batch's transaction, rows copied
        merging: asyncio.Future | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"import-{self.import_id}") as ex:
            try:
                # parse batch n+1 in the thread while Postgres merges batch n
                fut = loop.run_in_executor(ex, next, gen, None)
                t0 = time.perf_counter()
                batch: Batch | None = await fut
                self._lap("wait_reader", t0)
                i = 0
                while batch is not None:
                    conn = conns[i % len(conns)]
                    if staged is None:
                        staged = asyncio.ensure_future(self._stage(conn, batch))
                    tx = await staged
                    staged = None
                    fut = loop.run_in_executor(ex, next, gen, None)
                    self.inflight_rows = batch.rows
                    merging = asyncio.ensure_future(
                        self._commit_batch(conn, tx, batch, merge_sql, mode, source, fd, enc))
                    nxt: Batch | None = await fut
                    parsed = time.perf_counter()
                    if nxt is not None and overlap:
                        staged = asyncio.ensure_future(self._stage(conns[(i + 1) % 2], nxt))
                    if merging.done():  # Postgres waited for the reader since the merge ended
                        self._lap("wait_reader", min(parsed, self._merged_at))
                    result = await merging
                    merging = None
                    self.inflight_rows = 0
                    self.committed_rows += result.rows
                    self._count(result)
                    if self.options.batch_pause:
                        await asyncio.sleep(self.options.batch_pause)
                    self._check_cancel()
                    batch, i = nxt, i + 1
            finally:
                reader.stop.set()
                for task in (merging, staged):  # an error or a cancel left them in flight
                    if task is not None:
                        try:
                            tx = await task
                            if task is staged:
                                await tx.rollback()
                        except BaseException:
                            pass
                os.close(fd)
                log.info("import load stages", extra={
                    "rows": self.committed_rows, **{f"{k}_s": round(v, 3) for k, v in self.stages.items()}})

    async def _stage(self, conn, batch: Batch):
        """Open the batch's transaction on ``conn``, COPY its rows into the staging table and
        the error rows the reader found into ``import_errors`` (committed with the batch)."""
        t = time.perf_counter()
        tx = conn.transaction()
        await tx.start()
        try:
            if batch.staged:
                await conn.copy_to_table("import_stage", source=memoryview(batch.copy_data),
                                         columns=self.stage_columns, null=COPY_NULL)
            if batch.errors:
                iid = self.import_id
                await conn.copy_records_to_table(
                    "import_errors", records=[(iid, ln, reason, raw) for ln, reason, raw in batch.errors],
                    columns=ERROR_COLUMNS)
        except BaseException:
            await _rollback(tx)
            raise
        self._lap("copy", t)
        return tx

    def _lap(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - t0
        return now

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    async def _commit_batch(self, conn, tx, batch: Batch, merge_sql, mode, source, fd, enc) -> BatchResult:
        """Merge the staged batch, record its error rows and checkpoint, and commit ``tx``."""
        iid = self.import_id
        reasons: dict[str, int] = {}
        for _, reason, _ in batch.errors:  # their error rows were written with the staged rows
            reasons[reason] = reasons.get(reason, 0) + 1
        py_dups = reasons.get(DUPLICATE, 0)
        res = BatchResult(rows=batch.rows, invalid=len(batch.errors) - py_dups)
        t = time.perf_counter()
        try:
            self._check_cancel()
            inserted = updated = missed = 0
            dup_lines: list[int] = []
            if batch.staged:
                inserted, updated, missed = await conn.fetchrow(merge_sql, iid, source)
                t = self._lap("merge", t)
                self._check_cancel()
                if missed:
                    if mode == "update":
                        dup_lines = [r[0] for r in await conn.fetch("SELECT line FROM import_missed ORDER BY line")]
                    else:
                        dup_lines = [r[0] for r in await conn.fetch(CLASSIFY_SKIP, iid)]
                    t = self._lap("classify", t)
            if dup_lines:
                reasons[DUPLICATE] = reasons.get(DUPLICATE, 0) + len(dup_lines)
                await conn.copy_records_to_table(
                    "import_errors", records=[(iid, ln, DUPLICATE, batch.raw_of(fd, ln, enc)) for ln in dup_lines],
                    columns=ERROR_COLUMNS)
                t = self._lap("errors", t)
            res.inserted, res.updated = inserted, updated
            res.skipped = missed - len(dup_lines)
            res.duplicates = py_dups + len(dup_lines) + res.skipped
            res.reasons = reasons
            self._check_cancel()
            cancel = await conn.fetchval(
                CHECKPOINT, iid, res.rows, res.inserted, res.updated, res.duplicates, res.invalid,
                res.skipped, batch.end_offset, batch.end_line)
            t = self._lap("checkpoint", t)
            if cancel:
                self.cancel.set()
                raise Cancelled()
        except BaseException:
            await _rollback(tx)
            raise
        await tx.commit()
        self._merged_at = self._lap("commit", t)
        return res

    def _count(self, r: BatchResult) -> None:
        m = self.metrics
        m.rows.labels("inserted").inc(r.inserted)
        m.rows.labels("updated").inc(r.updated)
        m.rows.labels("duplicate").inc(r.duplicates)
        m.rows.labels("invalid").inc(r.invalid)
        for reason, n in (r.reasons or {}).items():
            m.validation_errors.labels(reason).inc(n)

    # -- progress, cancel --------------------------------------------------------------------

    async def _watch(self) -> None:
        """Poll the cancel flag and publish live progress, every POLL_INTERVAL seconds, until
        ``self.stop_watch`` is set. It is stopped by that event, never cancelled: a cancel
        landing inside a client library call can be swallowed there and leave the loop running."""
        key = progress_key(self.settings, self.import_id)
        while not self.stop_watch.is_set():
            try:
                flag = await self.pool.fetchval("SELECT cancel_requested FROM imports WHERE id = $1",
                                                self.import_id)
                if flag and not self.cancel.is_set():
                    self.cancel.set()
                    # stop the statement in flight too: cancel takes effect within a poll
                    # interval even when one merge takes seconds (a batch rolls back whole)
                    await self.pool.execute("SELECT pg_cancel_backend(p) FROM unnest($1::int[]) p", self.job_pids)
                processed = self.committed_rows + self.inflight_rows
                await self.redis.set(key, json.dumps({"processed": processed, "at": time.time()}),
                                     ex=PROGRESS_TTL)
            except Exception:  # progress is best effort; the job goes on
                log.warning("progress update failed", exc_info=True)
            try:
                await asyncio.wait_for(self.stop_watch.wait(), POLL_INTERVAL)
            except TimeoutError:
                pass

    async def _finish(self, conn, status: str, error: str | None) -> None:
        row = await jobs.finish(conn, self.import_id, status, error)
        await conn.execute("DELETE FROM import_skipped WHERE import_id = $1", self.import_id)
        try:
            await self.redis.delete(progress_key(self.settings, self.import_id))
        except Exception:
            log.warning("could not clear live progress", exc_info=True)
        if row is None:
            return
        self.metrics.jobs.labels(status).inc()
        if row["started_at"] is not None:
            self.metrics.duration.observe((row["finished_at"] - row["started_at"]).total_seconds())
        log.info("import finished", extra={"status": status, "error": error})


async def _rollback(tx) -> None:
    try:
        await tx.rollback()
    except Exception:  # a broken connection has no transaction left to roll back
        pass


async def run_import(pool, redis, settings, import_id: int, *, metrics: ImportMetrics,
                     options: ImportOptions | None = None) -> str:
    return await ImportJob(pool, redis, settings, import_id, metrics=metrics, options=options).run()
