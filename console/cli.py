"""Subcommands of the operator tools: stack-prepare, status, check, demo, report, cleanup-uploads,
db-maintenance, slow-queries, backup, restore, scheduler, logs."""

from __future__ import annotations

import argparse

from . import backup, demo, logs, maintenance, report, scheduler, stack, status
from .base import guard


def register(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("stack-prepare", formatter_class=fmt,
                       help="check ports, render local Prometheus/Alertmanager configs, print where everything is (scripts/run.sh)")
    p.add_argument("--root", default=".", help="repository root holding prometheus/ and alertmanager/")
    p.set_defaults(func=guard(stack.cmd_stack_prepare))

    p = sub.add_parser("status", formatter_class=fmt,
                       help="one table of every service and dependency; exit 1 when anything is unhealthy")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables (for scripts)")
    p.add_argument("--strict", action="store_true", help="exit 1 on 'degraded' too, not only on 'unhealthy'")
    p.set_defaults(func=guard(status.cmd_status))

    p = sub.add_parser("check", formatter_class=fmt, help="check one service or dependency in detail")
    p.add_argument("service", help=f"one of: {', '.join(status.CHECK_NAMES)} (also: {', '.join(status.CHECK_ALIASES)})")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=guard(status.cmd_check))

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="realistic traffic: import leads, send a campaign to the sink, post signed events")
    p.add_argument("--leads", type=int, default=200, help="synthetic leads to import and mail; raise for busier charts")
    p.add_argument("--api-key", default=None,
                   help="API key with import+send scopes (default: $MAILGENIUS_API_KEY, else one is created)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for a reproducible demo")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the import and the campaign")
    p.set_defaults(func=guard(demo.cmd_demo))

    p = sub.add_parser("report", formatter_class=fmt,
                       help="the operations guide's daily/weekly performance report (HTML with charts)")
    p.add_argument("kind", choices=sorted(report.REPORT_PERIODS))
    p.add_argument("--out", required=True, help="HTML file to write (charts are embedded)")
    p.add_argument("--prometheus-url", default=None, help="Prometheus to query (default: MAILGENIUS_PROMETHEUS_URL)")
    p.set_defaults(func=guard(report.cmd_report))

    p = sub.add_parser("cleanup-uploads", formatter_class=fmt,
                       help="delete old upload files that no queued/running import needs")
    p.add_argument("--older-than-hours", type=float, default=24.0, help="only files older than this")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.set_defaults(func=guard(maintenance.cmd_cleanup_uploads))

    p = sub.add_parser("db-maintenance", formatter_class=fmt, help="VACUUM (ANALYZE) every table; optionally REINDEX")
    p.add_argument("--reindex", action="store_true", help="also REINDEX (locks each table while it runs)")
    p.add_argument("--table", action="append", default=None, help="only this table (repeatable)")
    p.set_defaults(func=guard(maintenance.cmd_db_maintenance))

    p = sub.add_parser("slow-queries", formatter_class=fmt, help="slowest statements from pg_stat_statements")
    p.add_argument("--limit", type=int, default=20, help="statements to show")
    p.add_argument("--min-mean-ms", type=float, default=0.0, help="hide statements faster than this on average")
    p.set_defaults(func=guard(maintenance.cmd_slow_queries))

    p = sub.add_parser("backup", formatter_class=fmt,
                       help="one file (mode 0600) with the database dump, the uploads of unfinished imports and "
                            "the generated secrets")
    p.add_argument("--out", default=None, help="backup file (default: <data dir>/backups/mailgenius-<UTC time>.tar)")
    p.add_argument("--dir", default=None, help="folder for timestamped backups (default: <data dir>/backups)")
    p.add_argument("--keep", type=int, default=7, help="backups to keep in that folder (0 keeps all)")
    p.set_defaults(func=guard(backup.cmd_backup))

    p = sub.add_parser("restore", formatter_class=fmt,
                       help="restore a backup into an empty database (and its upload files and secrets)")
    p.add_argument("file", help="a file written by `mailgenius backup` (or a bare pg_dump custom-format dump)")
    p.add_argument("--database-url", default=None, help="target database (default: DATABASE_URL); created if missing")
    p.add_argument("--force", action="store_true",
                   help="replace the contents of a non-empty database, and overwrite existing files")
    p.set_defaults(func=guard(backup.cmd_restore))

    p = sub.add_parser("scheduler", formatter_class=fmt,
                       help="run the daily/weekly maintenance on its schedule (MAILGENIUS_SCHEDULE_<TASK>)")
    p.add_argument("--list", action="store_true", help="print each task's schedule and next run, then exit")
    p.add_argument("--run-now", default=None, metavar="TASK", help="run one task now, record it, then exit")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="metrics port (default: MAILGENIUS_SCHEDULER_METRICS_PORT, else 9194)")
    p.set_defaults(func=scheduler.cmd_scheduler)

    p = sub.add_parser("logs", formatter_class=fmt, help="read the JSON logs of `make run` (<data dir>/log)")
    p.add_argument("--service", action="append", default=None, help="only this process (repeatable)")
    p.add_argument("--level", default="info", help="this level and above: debug, info, warning, error, critical")
    p.add_argument("--lines", type=int, default=100, help="last N matching lines (0: all)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.add_argument("--json", action="store_true", help="print the JSON objects as they are")
    p.add_argument("--dir", default=None, help="log folder (default: <data dir>/log)")
    p.set_defaults(func=logs.cmd_logs)
