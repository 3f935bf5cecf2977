"""The capped Redis log stream: real Redis, real logging calls."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import redis

from mailgenius import logs
from mailgenius.logstream import FIELDS, RedisStreamHandler, attach_log_stream, stream_key
from tests.conftest import ROOT, free_port


def _entries(client, key):
    return [{k.decode(): v.decode() for k, v in fields.items()} for _id, fields in client.xrange(key)]


def test_warning_and_above_reach_the_stream_with_every_field(redis_url, redis_prefix):
    # Given a logger with the stream handler
    key = stream_key(f"{redis_prefix}-a")
    handler = RedisStreamHandler(redis_url, key, "sender")
    logger = logging.getLogger("test.logstream.a")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    client = redis.Redis.from_url(redis_url)
    try:
        # When it logs at every level, one of them inside a request context
        logger.debug("debug line")
        logger.info("info line")
        with logs.bound(request_id="req-123"):
            logger.warning("disk almost full: %s%%", 91)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("import failed")
        logger.critical("down", extra={"import_id": 7, "error": "disk full"})
        assert handler.flush(5)
        # Then only WARNING and above are in the stream, with the documented fields
        entries = _entries(client, key)
        assert [e["level"] for e in entries] == ["warning", "error", "critical"]
        assert all(set(e) == set(FIELDS) for e in entries)
        assert entries[0]["message"] == "disk almost full: 91%"
        assert entries[0]["request_id"] == "req-123"
        assert entries[0]["service"] == "sender" and entries[0]["logger"] == "test.logstream.a"
        assert entries[1]["message"] == "import failed (ValueError: boom)"
        assert entries[2]["request_id"] == ""
        assert entries[2]["message"] == "down · import_id=7 error=disk full"
        assert handler.dropped == 0
    finally:
        logger.removeHandler(handler)
        handler.close()
        client.delete(key)
        client.close()


def test_stream_stays_capped(redis_url, redis_prefix):
    # Given a handler capped at 100 entries
    key = stream_key(f"{redis_prefix}-b")
    handler = RedisStreamHandler(redis_url, key, "importer", maxlen=100)
    logger = logging.getLogger("test.logstream.b")
    logger.propagate = False
    logger.addHandler(handler)
    client = redis.Redis.from_url(redis_url)
    try:
        # When 1,500 warnings are logged
        for i in range(1500):
            logger.warning("w %d", i)
            if i % 500 == 499:
                assert handler.flush(5)
        assert handler.flush(5)
        # Then the stream is bounded (MAXLEN ~ trims whole nodes: a little over 100 at most)
        length = client.xlen(key)
        assert 100 <= length < 300
        last = client.xrevrange(key, count=1)[0][1]
        assert last[b"message"] == b"w 1499"
    finally:
        logger.removeHandler(handler)
        handler.close()
        client.delete(key)
        client.close()


def test_redis_down_never_blocks_the_caller(redis_prefix):
    # Given a handler pointing at a port where nothing listens
    handler = RedisStreamHandler(f"redis://127.0.0.1:{free_port()}/0", stream_key(redis_prefix), "x",
                                 queue_size=10)
    logger = logging.getLogger("test.logstream.c")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        # When many warnings are logged
        start = time.perf_counter()
        for i in range(200):
            logger.warning("w %d", i)
        elapsed = time.perf_counter() - start
        # Then logging stays fast and the lost records are counted
        assert elapsed < 1.0
    finally:
        logger.removeHandler(handler)
        handler.close()
    # every record is accounted for as lost (the queue overflowed or the write failed)
    assert handler.dropped == 200


def test_attach_replaces_and_can_be_disabled(settings, monkeypatch):
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        h1 = attach_log_stream(settings, "exporter")
        h2 = attach_log_stream(settings, "exporter")
        assert [h for h in root.handlers if isinstance(h, RedisStreamHandler)] == [h2]
        assert h1 is not h2
        off = settings.replace(logs=settings.logs.replace(stream_maxlen=0))  # MAILGENIUS_LOG_STREAM_MAXLEN=0
        assert attach_log_stream(off, "exporter") is None
        assert not [h for h in root.handlers if isinstance(h, RedisStreamHandler)]
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()


def test_served_process_sends_its_warnings(settings, tmp_path):
    # Given a separate process wired like `mailgenius serve` (setup_logging + attach_log_stream)
    script = tmp_path / "emit.py"
    script.write_text(
        "import logging, sys\n"
        "from mailgenius.logs import setup_logging\n"
        "from mailgenius.logstream import attach_log_stream\n"
        "from mailgenius.settings import load_settings\n"
        "s = load_settings()\n"
        "setup_logging('sender', s.log_level)\n"
        "h = attach_log_stream(s, 'sender')\n"
        "logging.getLogger('sender.x').error('provider rejected: %s', 'quota')\n"
        "assert h.flush(5)\n"
    )
    env = {**os.environ, "REDIS_URL": settings.redis_url, "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix,
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    client = redis.Redis.from_url(settings.redis_url)
    try:
        entries = _entries(client, stream_key(settings.redis_prefix))
        assert any(e["message"] == "provider rejected: quota" and e["level"] == "error" for e in entries)
    finally:
        client.close()


def test_bad_stream_cap_is_a_clear_configuration_error(settings):
    env = {**os.environ, "REDIS_URL": settings.redis_url, "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix,
           "DATABASE_URL": settings.database_url, "MAILGENIUS_LOG_STREAM_MAXLEN": "lots"}
    mailgenius = os.path.join(os.path.dirname(sys.executable), "mailgenius")
    out = subprocess.run([mailgenius, "serve", "exporter", "--port", str(free_port())], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "MAILGENIUS_LOG_STREAM_MAXLEN" in out.stderr and "Traceback" not in out.stderr
