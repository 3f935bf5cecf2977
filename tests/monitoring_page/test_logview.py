"""Reading the capped log stream in chunks: no entry skipped or repeated at chunk edges, in
either direction. Real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from exporter.monitoring_page import logview
from exporter.monitoring_page.logview import LogFilter, read_logs
from mailgenius.logstream import stream_key


@pytest.fixture
async def stream(redis_url, redis_prefix, monkeypatch):
    """37 entries: every 3rd from the importer at error level, the rest sender warnings."""
    monkeypatch.setattr(logview, "CHUNK", 4)  # many chunk edges
    prefix = f"{redis_prefix}-lv"
    client = aioredis.from_url(redis_url)
    key = stream_key(prefix)
    await client.delete(key)
    for i in range(37):
        service, level = ("importer", "error") if i % 3 == 0 else ("sender", "warning")
        await client.xadd(key, {"ts": f"t{i}", "level": level, "service": service, "logger": "l",
                                "message": f"m{i}", "request_id": ""})
    yield client, prefix
    await client.delete(key)
    await client.aclose()


async def test_backwards_read_finds_the_newest_matches_across_chunks(stream):
    client, prefix = stream
    entries, newest = await read_logs(client, prefix, LogFilter(service="importer"), limit=5)
    assert [e["message"] for e in entries] == ["m24", "m27", "m30", "m33", "m36"]
    all_entries, _ = await read_logs(client, prefix, LogFilter(), limit=1000)
    assert [e["message"] for e in all_entries] == [f"m{i}" for i in range(37)]
    assert newest == all_entries[-1]["id"]
    few, _ = await read_logs(client, prefix, LogFilter(level="error", text="m1"), limit=100)
    assert [e["message"] for e in few] == ["m12", "m15", "m18"]


async def test_forward_read_pages_without_gaps(stream):
    client, prefix = stream
    all_entries, _ = await read_logs(client, prefix, LogFilter(), limit=1000)
    # start after the 5th entry and page by 3 matching importer entries at a time
    cursor = all_entries[4]["id"]
    seen = []
    for _ in range(10):
        page, cursor = await read_logs(client, prefix, LogFilter(service="importer"), after=cursor, limit=3)
        if not page:
            break
        seen += [e["message"] for e in page]
    assert seen == [f"m{i}" for i in range(6, 37, 3)]
    assert cursor == all_entries[-1]["id"]


async def test_scan_limit_bounds_a_read(stream, monkeypatch):
    client, prefix = stream
    monkeypatch.setattr(logview, "SCAN_LIMIT", 8)
    entries, _ = await read_logs(client, prefix, LogFilter(service="importer"), limit=100)
    # only the 8 newest entries (m29..m36) were looked at
    assert [e["message"] for e in entries] == ["m30", "m33", "m36"]
