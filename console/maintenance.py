"""Maintenance commands (the guide's daily / weekly scripts): ``cleanup-uploads``,
``db-maintenance``, ``slow-queries``. (``backup`` and ``restore`` live in :mod:`console.backup`.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mailgenius.settings import Settings

from .base import OpsError, format_table
from .stack import ops_settings


async def _cleanup_uploads(settings: Settings, older_than: float, dry_run: bool):
    import asyncpg

    from importer.uploads import cleanup_uploads

    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        return await cleanup_uploads(conn, settings.upload_dir, older_than, dry_run)
    finally:
        await conn.close()


def cmd_cleanup_uploads(args) -> int:
    """Delete upload files older than ``--older-than-hours`` that no queued or running import
    still needs (the guide's ``find /tmp/uploads -mtime +1 -delete``, made safe). The rule is the
    importer's own (importer/uploads.py ``cleanup_uploads``, as ``POST /api/upload/cleanup``):
    an import needs its upload and the ``.utf8`` transcoding beside it. Stuck imports are not
    requeued from here (that needs the importer's broker: use the HTTP cleanup)."""
    settings = ops_settings()
    root = Path(settings.upload_dir)
    if not root.exists():
        print(f"cleanup-uploads: {root} does not exist; nothing to do")
        return 0
    if args.older_than_hours < 0:
        raise OpsError("--older-than-hours must be >= 0", 2)
    res = asyncio.run(_cleanup_uploads(settings, args.older_than_hours * 3600, args.dry_run))
    if args.dry_run:
        for path in res.removed:
            print(f"would remove {path}")
    verb = "would free" if args.dry_run else "freed"
    print(f"cleanup-uploads: {len(res.removed)} file(s) older than {args.older_than_hours:g} h "
          f"{'to remove' if args.dry_run else 'removed'}, "
          f"{verb} {res.freed / 2**20:.2f} MiB; {len(res.kept)} kept for queued/running imports")
    if res.failed:
        raise OpsError(f"{len(res.failed)} file(s) could not be removed: "
                       + "; ".join(f"{p}: {why}" for p, why in res.failed[:5]))
    return 0


async def _db_maintenance(settings: Settings, *, reindex: bool, tables: list[str] | None) -> list[dict]:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url, timeout=10, command_timeout=3600)
    try:
        names = tables or [r["relname"] for r in await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'public' ORDER BY relname")]
        known = {r["relname"] for r in await conn.fetch("SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'public'")}
        unknown = [t for t in names if t not in known]
        if unknown:
            raise OpsError(f"no such table(s): {', '.join(unknown)}", 2)
        out = []
        for name in names:
            before = await conn.fetchval("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = $1", name)
            start = time.monotonic()
            ident = '"' + name.replace('"', '""') + '"'
            await conn.execute(f"VACUUM (ANALYZE) {ident}")
            if reindex:
                await conn.execute(f"REINDEX TABLE {ident}")
            size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", ident)
            out.append({"table": name, "dead_before": before, "seconds": time.monotonic() - start, "bytes": size})
        return out
    finally:
        await conn.close()


def cmd_db_maintenance(args) -> int:
    """VACUUM (ANALYZE) every table (optionally REINDEX), with dead rows and sizes."""
    settings = ops_settings()
    rows = asyncio.run(_db_maintenance(settings, reindex=args.reindex, tables=args.table))
    print(format_table([[r["table"], r["dead_before"], f"{r['bytes'] / 2**20:.2f} MiB", f"{r['seconds']:.2f} s"] for r in rows],
                       ["TABLE", "DEAD ROWS BEFORE", "SIZE", "TIME"]))
    print(f"db-maintenance: VACUUM (ANALYZE){' + REINDEX' if args.reindex else ''} done on {len(rows)} table(s)")
    return 0


#: what `slow-queries` prints when pg_stat_statements cannot be used, and how to fix it
PG_STAT_STATEMENTS_HELP = (
    "pg_stat_statements is not available on this server: {why}.\n"
    "Enable it: add  shared_preload_libraries = 'pg_stat_statements'  to postgresql.conf (or run\n"
    "  ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';  as a superuser), restart\n"
    "PostgreSQL, and run this command again (it creates the extension). scripts/setup.sh does the\n"
    "ALTER SYSTEM part on local clusters; docker-compose.yml starts Postgres with it."
)


async def _slow_queries(settings: Settings, *, limit: int, min_mean_ms: float) -> list[dict]:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url, timeout=10)
    try:
        preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        if "pg_stat_statements" not in (preload or ""):
            raise OpsError(PG_STAT_STATEMENTS_HELP.format(why="it is not in shared_preload_libraries"), 2)
        available = await conn.fetchval("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'")
        if not available:
            raise OpsError(PG_STAT_STATEMENTS_HELP.format(why="the extension is not installed (package postgresql-contrib)"), 2)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except asyncpg.PostgresError as exc:
            raise OpsError(PG_STAT_STATEMENTS_HELP.format(why=f"CREATE EXTENSION failed ({exc})"), 2) from None
        rows = await conn.fetch(
            """SELECT query, calls, total_exec_time AS total_ms, mean_exec_time AS mean_ms,
                      stddev_exec_time AS stddev_ms, rows
               FROM pg_stat_statements
               WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND mean_exec_time >= $1
               ORDER BY total_exec_time DESC LIMIT $2""", min_mean_ms, limit)
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def cmd_slow_queries(args) -> int:
    """The guide's slow-query analysis: pg_stat_statements ordered by total time."""
    settings = ops_settings()
    rows = asyncio.run(_slow_queries(settings, limit=args.limit, min_mean_ms=args.min_mean_ms))
    if not rows:
        print(f"slow-queries: no statement with a mean time >= {args.min_mean_ms:g} ms recorded yet")
        return 0
    table = [[f"{r['total_ms']:.1f}", f"{r['mean_ms']:.2f}", f"{r['stddev_ms']:.2f}", r["calls"], r["rows"],
              " ".join(r["query"].split())[:90]] for r in rows]
    print(format_table(table, ["TOTAL MS", "MEAN MS", "STDDEV MS", "CALLS", "ROWS", "QUERY"]))
    return 0
