"""WARNING-and-above log records to a capped Redis stream, read by the monitoring page.

Every service (``mailgenius serve``) and worker process (``mailgenius worker``) calls
:func:`attach_log_stream` right after :func:`mailgenius.logs.setup_logging`. The stream is
``<MAILGENIUS_REDIS_PREFIX>:logs``; each entry has the string fields :data:`FIELDS`, and the
stream is trimmed on every write with ``XADD ... MAXLEN ~ N`` so it never outgrows ~N entries.

The handler never blocks the code that logs: ``emit`` only puts the record on a bounded
in-memory queue, and a daemon thread writes batches with one pipelined round trip. When Redis is
slow or down, or the queue is full, records are dropped *from the stream only* (the JSON handler
on stderr still has them) and counted in :attr:`RedisStreamHandler.dropped` — a monitoring aid
must not take the service down with it. The writer thread is restarted after a fork (dramatiq
forks its worker processes).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import queue
import threading

import redis as syncredis

from . import logs
from .settings import DEFAULT_LOG_STREAM_MAXLEN

#: Fields of every stream entry, in display order.
FIELDS = ("ts", "level", "service", "logger", "message", "request_id")
#: Default cap of the stream (approximate: Redis trims whole macro-nodes). Change it with
#: ``MAILGENIUS_LOG_STREAM_MAXLEN`` (``settings.logs.stream_maxlen``; 0 disables the stream)
#: when you want more history.
DEFAULT_MAXLEN = DEFAULT_LOG_STREAM_MAXLEN
#: Longest message kept in the stream (characters); longer ones are cut with an ellipsis.
MAX_MESSAGE_CHARS = 2_000
#: Records waiting for the writer thread before new ones are dropped.
QUEUE_SIZE = 2_000
#: Records written per pipelined round trip.
BATCH = 200
#: Seconds to wait after a failed write before trying Redis again.
RETRY_AFTER = 2.0


def stream_key(prefix: str) -> str:
    """The stream of one deployment (tests isolate it with their own prefix)."""
    return f"{prefix}:logs"


def record_fields(record: logging.LogRecord, service: str) -> dict[str, str]:
    """The stream entry of one record: flat strings only."""
    message = record.getMessage()
    extras = [f"{k}={v}" for k, v in record.__dict__.items()
              if k not in logs.RESERVED_ATTRS and not k.startswith("_") and k != "request_id"]
    if extras:  # the structured fields (import_id=7 error=...) say what the message is about
        message = f"{message} · {' '.join(extras)}"
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        message = f"{message} ({type(exc).__name__}: {exc})"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    rid = getattr(record, "request_id", None) or logs.current("request_id") or ""
    return {
        "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "service": service,
        "logger": record.name,
        "message": message,
        "request_id": str(rid),
    }


class RedisStreamHandler(logging.Handler):
    """Send records at ``level`` and above to the capped Redis stream ``key``.

    Parameters:
      redis_url: the Redis holding the stream (our cache).
      key: the stream key, normally :func:`stream_key` of the settings prefix.
      service: the ``service`` field of every entry (``sender``, ``importer-worker``...).
      maxlen: approximate cap of the stream (``XADD MAXLEN ~``).
      level: lowest level sent; WARNING by default (the stream is for what needs attention).
    """

    def __init__(self, redis_url: str, key: str, service: str, *, maxlen: int = DEFAULT_MAXLEN,
                 level: int = logging.WARNING, queue_size: int = QUEUE_SIZE):
        super().__init__(level)
        self.redis_url = redis_url
        self.key = key
        self.service = service
        self.maxlen = maxlen
        #: records that never reached the stream (queue full or Redis unavailable)
        self.dropped = 0
        self._queue: queue.Queue[dict[str, str] | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._start_lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()  # cuts a retry back-off short at close()

    # -- producer side (any thread) --------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:
            return
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            return  # never feed the writer's own complaints (e.g. from redis-py) back to it
        try:
            fields = record_fields(record, self.service)
        except Exception:
            self.handleError(record)
            return
        self._ensure_writer()
        try:
            self._queue.put_nowait(fields)
        except queue.Full:
            self.dropped += 1

    def _ensure_writer(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return
            if self._pid != os.getpid():  # forked: the parent's queue and thread are not ours
                self._queue = queue.Queue(self._queue.maxsize)
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="log-stream-writer", daemon=True)
            self._thread.start()

    # -- writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        client = syncredis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=1)
        q = self._queue
        try:
            while True:
                item = q.get()
                if item is None:
                    q.task_done()
                    return
                batch = [item]
                stop = False
                while len(batch) < BATCH:
                    try:
                        nxt = q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        q.task_done()
                        break
                    batch.append(nxt)
                self._write(client, batch)
                for _ in batch:
                    q.task_done()
                if stop:
                    return
        finally:
            client.close()

    def _write(self, client: syncredis.Redis, batch: list[dict[str, str]]) -> None:
        try:
            pipe = client.pipeline(transaction=False)
            for fields in batch:
                pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
            pipe.execute()
        except Exception:
            self.dropped += len(batch)
            # back off without spinning; records arriving meanwhile wait in the bounded queue
            self._closing.wait(RETRY_AFTER)

    # -- lifecycle -------------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record was written (or dropped); True when drained."""
        if self._thread is None or not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()

        def waiter():
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._closing.set()
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                try:
                    self._queue.put(None, timeout=1)
                except queue.Full:
                    pass
                self._thread.join(timeout=3)
        super().close()


def attach_log_stream(settings, service: str, *, maxlen: int | None = None) -> RedisStreamHandler | None:
    """Add (or replace) the stream handler on the root logger; returns it, or None when
    disabled with ``MAILGENIUS_LOG_STREAM_MAXLEN=0`` (``settings.logs.stream_maxlen``)."""
    maxlen = settings.logs.stream_maxlen if maxlen is None else maxlen
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, RedisStreamHandler)]:
        root.removeHandler(old)
        old.close()
    if maxlen <= 0:
        return None
    handler = RedisStreamHandler(settings.redis_url, stream_key(settings.redis_prefix), service,
                                 maxlen=maxlen)
    root.addHandler(handler)
    return handler
