"""``mailgenius queue ...`` and ``mailgenius incidents``: the operator API's queue and incident
functions straight from a shell, against the broker and Postgres (they work while the exporter
itself is down)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from mailgenius import metrics as m


def _settings():
    from mailgenius.settings import settings_or_exit

    return settings_or_exit()


def cmd_queue(args) -> int:
    from mailgenius.cache import create_redis
    from mailgenius.queues import worker_count

    from .brokers import AdminError, queue_admin, queue_stats

    settings = _settings()
    config = settings.exporter

    async def run() -> int:
        redis = create_redis(settings.redis_url)
        try:
            if args.action == "status":
                print(f"broker: {settings.broker_kind}")
                print(f"{'queue':16s} {'waiting':>8s} {'delayed':>8s} {'dead':>8s} {'oldest_s':>9s} {'workers':>8s}")
                for q in m.QUEUES:
                    st = await queue_stats(settings, redis, q)
                    n = await worker_count(redis, settings.redis_prefix, q, stale_after=config.worker_stale_seconds)
                    age = "-" if st.oldest_age_seconds is None else f"{st.oldest_age_seconds:.1f}"
                    print(f"{q:16s} {st.waiting:8d} {st.delayed:8d} {st.dead:8d} {age:>9s} {n:8d}")
                return 0
            try:
                res = await queue_admin(settings, redis, args.queue, args.action, args.type,
                                        dry_run=args.dry_run, known_queues=m.QUEUES)
            except AdminError as exc:
                print(f"mailgenius: {exc}", file=sys.stderr)
                return 2
            verb = {"clear": "cleared", "retry": "retried"}[args.action]
            print(f"{res.count} {args.type} message(s) of {args.queue} "
                  + ("would be " + verb + " (dry run)" if args.dry_run else verb))
            return 0
        finally:
            await redis.aclose()

    return asyncio.run(run())


def cmd_incidents(args) -> int:
    import asyncpg

    from .collectors import incident_stats
    from .incidents import list_incidents

    settings = _settings()

    async def run() -> int:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            rows = await list_incidents(pool, status="open" if args.open else None, severity=None, limit=args.limit)
            stats = await incident_stats(pool, 30.0)
        finally:
            await pool.close()
        if args.json:
            print(json.dumps({"incidents": rows, "open": stats.open_by_severity, "mttr_seconds": stats.mttr_seconds,
                              "mtbf_seconds": stats.mtbf_seconds}, default=str, indent=2))
            return 0
        for r in rows:
            print(f"{r['id']:>6} {r['status']:8s} {r['severity']:8s} {r['started_at']:%Y-%m-%d %H:%M:%S} "
                  f"{r['duration_seconds']:>9.0f}s {r['alertname']}  {r['summary'] or ''}")
        fmt = lambda v: "n/a" if v is None else f"{v:.0f}s"  # noqa: E731
        print(f"open: {stats.open_by_severity or 0}; MTTR {fmt(stats.mttr_seconds)}; MTBF {fmt(stats.mtbf_seconds)} (30 days)")
        return 0

    return asyncio.run(run())


def register(subparsers) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("queue", formatter_class=fmt,
                              help="queue depths and workers; clear or retry failed/waiting messages")
    p.add_argument("action", choices=("status", "clear", "retry"))
    p.add_argument("--queue", choices=m.QUEUES, default=m.QUEUE_EMAIL, help="the queue to act on (clear/retry)")
    p.add_argument("--type", choices=("failed", "waiting"), default="failed",
                   help="failed = dead-lettered messages; waiting = queued, not yet taken by a worker")
    p.add_argument("--dry-run", action="store_true", help="only count the messages that would be affected")
    p.set_defaults(func=cmd_queue)

    p = subparsers.add_parser("incidents", formatter_class=fmt, help="recent incidents, MTTR and MTBF")
    p.add_argument("--open", action="store_true", help="only incidents still open")
    p.add_argument("--limit", type=int, default=20, help="how many (newest first)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_incidents)
