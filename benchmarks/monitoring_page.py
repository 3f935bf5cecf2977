"""Monitoring page costs: what the log stream adds to a WARNING, and how fast the page reads and
exports a full (capped) stream. Prints figures; not a test.

    .venv/bin/python benchmarks/monitoring_page.py

Uses the local Redis (REDIS_URL) under a throw-away key prefix, deleted at the end.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid

import redis as syncredis

from exporter.monitoring_page.csvsafe import to_csv
from exporter.monitoring_page.logview import LogFilter, read_logs
from exporter.monitoring_page.routes import EXPORT_COLUMNS
from mailgenius.cache import create_redis
from mailgenius.logstream import DEFAULT_MAXLEN, RedisStreamHandler, stream_key
from mailgenius.settings import load_settings

#: records logged per timing run
N = 20_000


def time_logging(handler: logging.Handler | None) -> float:
    """Seconds per logger.warning() call with ``handler`` attached (None: a null handler)."""
    logger = logging.getLogger(f"bench.{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.addHandler(handler or logging.NullHandler())
    start = time.perf_counter()
    for i in range(N):
        logger.warning("provider slow: %d ms", i, extra={"campaign_id": 7})
    elapsed = time.perf_counter() - start
    logger.handlers.clear()
    return elapsed / N


async def time_reads(settings, prefix: str) -> dict[str, float]:
    redis = create_redis(settings.redis_url)
    out = {}
    try:
        for name, flt in (("all, newest 200", LogFilter()),
                          ("service+level+text filter", LogFilter("sender", "error", "relay"))):
            runs = []
            for _ in range(15):
                t = time.perf_counter()
                await read_logs(redis, prefix, flt, limit=200)
                runs.append(time.perf_counter() - t)
            out[f"read {name}"] = statistics.median(runs)
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            entries, _ = await read_logs(redis, prefix, LogFilter(), limit=DEFAULT_MAXLEN)
            to_csv(entries, EXPORT_COLUMNS)
            runs.append(time.perf_counter() - t)
        out[f"CSV export of the whole stream ({len(entries)} records)"] = statistics.median(runs)
    finally:
        await redis.aclose()
    return out


def main() -> None:
    settings = load_settings()
    prefix = f"bench-page-{uuid.uuid4().hex[:8]}"
    client = syncredis.Redis.from_url(settings.redis_url)
    try:
        base = time_logging(None)
        handler = RedisStreamHandler(settings.redis_url, stream_key(prefix), "sender")
        with_stream = time_logging(handler)
        t = time.perf_counter()
        assert handler.flush(60)
        drain = time.perf_counter() - t
        handler.close()
        print(f"logger.warning() without the stream: {base * 1e6:7.2f} µs/call")
        print(f"logger.warning() with the stream:    {with_stream * 1e6:7.2f} µs/call "
              f"(ratio {with_stream / base:.1f}x; the Redis write happens on the writer thread)")
        print(f"writer backlog drained {drain * 1000:.0f} ms after the last call; "
              f"dropped {handler.dropped} of {N} (queue overflow while Redis catches up)")
        print(f"stream length after {N} records: {client.xlen(stream_key(prefix))} (cap ~{DEFAULT_MAXLEN})")
        for name, secs in asyncio.run(time_reads(settings, prefix)).items():
            print(f"{name}: {secs * 1000:.1f} ms median")
    finally:
        client.delete(stream_key(prefix))
        client.close()


if __name__ == "__main__":
    main()
