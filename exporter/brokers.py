"""Queue depths and queue administration on either dramatiq broker.

Redis (the default): dramatiq's own keys (see mailgenius.queues): ``<ns>:<queue>`` (list of
waiting ids), ``<ns>:<queue>.msgs`` (their bodies), ``<ns>:<queue>.DQ`` (delayed),
``<ns>:<queue>.XQ`` + ``.XQ.msgs`` (dead letters). Admin operations are Lua scripts, so each batch
is atomic with respect to workers fetching messages: a message is either cleared/retried or
delivered, never both, and messages a worker already holds are never touched.

RabbitMQ (``BROKER_URL=amqp://``): dramatiq declares ``<queue>``, ``<queue>.DQ`` and ``<queue>.XQ``;
depths come from passive ``queue.declare`` (ready messages); clearing is ``queue.purge``; retrying
moves dead letters back one by one (``basic.get`` + publish + ack). RabbitMQ cannot tell the age of
a queue's head without consuming it, so ``oldest_age_seconds`` is None there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mailgenius.broker import dramatiq_namespace
from mailgenius.queues import broker_queue_stats, rabbitmq_connect, rabbitmq_ready_count

#: messages moved per Lua call: bounds how long one admin batch blocks Redis
ADMIN_BATCH = 1000

ACTIONS = ("clear", "retry")
TYPES = ("failed", "waiting")

_CLEAR_WAITING = """
local ids = redis.call('lpop', KEYS[1], ARGV[1])
if not ids then return 0 end
redis.call('hdel', KEYS[2], unpack(ids))
return #ids
"""

_CLEAR_FAILED = """
local ids = redis.call('zrange', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return 0 end
redis.call('zrem', KEYS[1], unpack(ids))
redis.call('hdel', KEYS[2], unpack(ids))
return #ids
"""

_RETRY_FAILED = """
local ids = redis.call('zrange', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return 0 end
local moved = 0
for _, id in ipairs(ids) do
    local body = redis.call('hget', KEYS[2], id)
    if body then
        redis.call('hset', KEYS[4], id, body)
        redis.call('rpush', KEYS[3], id)
        moved = moved + 1
    end
end
redis.call('zrem', KEYS[1], unpack(ids))
redis.call('hdel', KEYS[2], unpack(ids))
return moved
"""


class AdminError(ValueError):
    """A queue admin request that cannot be carried out as asked."""


@dataclass
class AdminResult:
    queue: str
    action: str
    type: str
    dry_run: bool
    #: messages selected (dry run) or affected
    count: int

    def as_dict(self) -> dict:
        return {"queue": self.queue, "action": self.action, "type": self.type,
                "dry_run": self.dry_run, "count": self.count}


# -- depths --------------------------------------------------------------------------------------

#: depths from whichever broker the settings name (the kernel's reading, shared with health checks)
queue_stats = broker_queue_stats


# -- administration ------------------------------------------------------------------------------

def _check(queue: str, action: str, type_: str, known_queues) -> None:
    if queue not in known_queues:
        raise AdminError(f"unknown queue {queue!r}; known: {', '.join(known_queues)}")
    if action not in ACTIONS:
        raise AdminError(f"unknown action {action!r}; choose clear or retry")
    if type_ not in TYPES:
        raise AdminError(f"unknown type {type_!r}; choose failed or waiting")
    if action == "retry" and type_ == "waiting":
        raise AdminError("waiting messages are already queued for delivery: only failed "
                         "(dead-lettered) messages can be retried")


async def queue_admin(settings, redis, queue: str, action: str, type_: str, *, dry_run: bool,
                      known_queues) -> AdminResult:
    """Clear (delete) or retry (move back to waiting) the failed or waiting messages of a queue.
    ``dry_run`` only counts them. The count covers the messages present when the call starts;
    messages enqueued meanwhile are left alone."""
    _check(queue, action, type_, known_queues)
    if settings.broker_kind == "rabbitmq":
        n = await asyncio.to_thread(_rabbit_admin, settings.broker_url, queue, action, type_, dry_run)
        return AdminResult(queue, action, type_, dry_run, n)
    ns = dramatiq_namespace(settings)
    base = f"{ns}:{queue}"
    if type_ == "waiting":
        target = int(await redis.llen(base))
    else:
        target = int(await redis.zcard(f"{base}.XQ"))
    if dry_run or target == 0:
        return AdminResult(queue, action, type_, dry_run, target)
    done = 0
    while done < target:
        batch = min(ADMIN_BATCH, target - done)
        if type_ == "waiting":
            n = await redis.eval(_CLEAR_WAITING, 2, base, f"{base}.msgs", batch)
        elif action == "clear":
            n = await redis.eval(_CLEAR_FAILED, 2, f"{base}.XQ", f"{base}.XQ.msgs", batch)
        else:
            n = await redis.eval(_RETRY_FAILED, 4, f"{base}.XQ", f"{base}.XQ.msgs", base,
                                 f"{base}.msgs", batch)
        if not n:
            break  # fewer than counted (a worker took some, or dead letters expired)
        done += int(n)
    return AdminResult(queue, action, type_, dry_run, done)


def _rabbit_admin(url: str, queue: str, action: str, type_: str, dry_run: bool) -> int:
    import pika

    source = queue if type_ == "waiting" else f"{queue}.XQ"
    conn = rabbitmq_connect(url)
    try:
        target = rabbitmq_ready_count(conn, source)
        if dry_run or target == 0:
            return target
        channel = conn.channel()
        try:
            if action == "clear":
                return int(channel.queue_purge(source).method.message_count)
            moved = 0
            for _ in range(target):
                method, props, body = channel.basic_get(source, auto_ack=False)
                if method is None:
                    break
                channel.basic_publish("", queue, body, properties=props or pika.BasicProperties(delivery_mode=2))
                channel.basic_ack(method.delivery_tag)
                moved += 1
            return moved
        finally:
            if channel.is_open:
                channel.close()
    finally:
        conn.close()
