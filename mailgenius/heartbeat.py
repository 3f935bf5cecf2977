"""Worker liveness heartbeats: the dramatiq middleware every worker process runs.

Every ``interval`` seconds each worker process writes ``<host>:<pid>`` with the current time into
the sorted set ``<prefix>:workers:<queue>`` of each queue it consumes. A worker is alive while its
last beat is younger than ``STALE_AFTER``. This works the same for the Redis and RabbitMQ brokers,
since the heartbeats live in Redis (our cache), not in the broker. :mod:`mailgenius.broker` adds
the middleware to worker brokers; :mod:`mailgenius.queues` counts the live workers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import dramatiq
import redis as syncredis

#: seconds without a heartbeat after which a worker counts as gone: a worker killed with -9
#: stops counting within this (plus one exporter refresh) of its death, well inside 15 s
STALE_AFTER = 10.0
#: seconds between two heartbeats of one worker process
HEARTBEAT_INTERVAL = 3.0


def workers_key(prefix: str, queue: str) -> str:
    return f"{prefix}:workers:{queue}"


class WorkerHeartbeat(dramatiq.Middleware):
    """Announce this worker process for the queues it consumes.

    Parameters:
      redis_url: the Redis holding the heartbeats (our cache, whatever the broker).
      prefix: our Redis key prefix (``MAILGENIUS_REDIS_PREFIX``).
      interval: seconds between beats; keep well below :data:`STALE_AFTER`.
    """

    def __init__(self, *, redis_url: str, prefix: str, interval: float = HEARTBEAT_INTERVAL):
        self.logger = logging.getLogger(type(self).__name__)
        self.redis_url = redis_url
        self.prefix = prefix
        self.interval = interval
        self.member = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queues: set[str] = set()

    def after_worker_boot(self, broker, worker):
        whitelist = worker.consumer_whitelist
        self._queues = set(whitelist) if whitelist else {q for q in broker.get_declared_queues() if not q.endswith(".DQ")}
        self.member = f"{socket.gethostname()}:{os.getpid()}"
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def before_worker_shutdown(self, broker, worker):
        self._stop.set()
        try:
            client = syncredis.Redis.from_url(self.redis_url, socket_timeout=2)
            for q in self._queues:
                client.zrem(workers_key(self.prefix, q), self.member)
            client.close()
        except Exception:  # Redis down at shutdown: the beat simply goes stale
            self.logger.warning("could not remove worker heartbeat", exc_info=True)

    def _run(self):
        client = syncredis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        while not self._stop.is_set():
            try:
                now = time.time()
                pipe = client.pipeline()
                for q in self._queues:
                    key = workers_key(self.prefix, q)
                    pipe.zadd(key, {self.member: now})
                    pipe.zremrangebyscore(key, "-inf", now - 10 * STALE_AFTER)
                    pipe.expire(key, int(10 * STALE_AFTER))
                pipe.execute()
                self._prune_dead(client)
            except Exception:
                self.logger.warning("worker heartbeat failed", exc_info=True)
            self._stop.wait(self.interval)
        client.close()


    def _prune_dead(self, client) -> None:
        """Drop the beats of this host's worker processes that no longer exist (killed with -9:
        no shutdown hook ran), so live counts drop at the next beat instead of after STALE_AFTER."""
        host = socket.gethostname() + ":"
        for q in self._queues:
            key = workers_key(self.prefix, q)
            for raw in client.zrange(key, 0, -1):
                member = raw.decode() if isinstance(raw, bytes) else raw
                if not member.startswith(host) or member == self.member:
                    continue
                try:
                    os.kill(int(member[len(host):]), 0)
                except ProcessLookupError:
                    client.zrem(key, member)
                except (ValueError, PermissionError):
                    pass
