"""Subcommands of the operator tools: backup, restore, scheduler, logs, supervise."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from mailgenius.ops import _guard

    from . import backup, logs, scheduler

    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("backup", formatter_class=fmt,
                       help="one file (mode 0600) with the database dump, the uploads of unfinished imports and "
                            "the generated secrets")
    p.add_argument("--out", default=None, help="backup file (default: <data dir>/backups/mailgenius-<UTC time>.tar)")
    p.add_argument("--dir", default=None, help="folder for timestamped backups (default: <data dir>/backups)")
    p.add_argument("--keep", type=int, default=7, help="backups to keep in that folder (0 keeps all)")
    p.set_defaults(func=_guard(backup.cmd_backup))

    p = sub.add_parser("restore", formatter_class=fmt,
                       help="restore a backup into an empty database (and its upload files and secrets)")
    p.add_argument("file", help="a file written by `mailgenius backup` (or a bare pg_dump custom-format dump)")
    p.add_argument("--database-url", default=None, help="target database (default: DATABASE_URL); created if missing")
    p.add_argument("--force", action="store_true",
                   help="replace the contents of a non-empty database, and overwrite existing files")
    p.set_defaults(func=_guard(backup.cmd_restore))

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
