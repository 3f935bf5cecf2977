"""dramatiq broker set-up: Redis (default) or RabbitMQ, chosen by ``BROKER_URL``.

Every process (API or worker) calls :func:`setup_broker` once before importing actor modules.
Workers also get dramatiq's Prometheus middleware (exposition on ``dramatiq_prom_port``); the
``mailgenius worker`` command sets the multiprocess directory before dramatiq starts.
"""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import AsyncIO

from .heartbeat import WorkerHeartbeat
from .settings import Settings


#: dramatiq's namespace (Redis key prefix) for a given settings prefix
def dramatiq_namespace(settings: Settings) -> str:
    return f"{settings.redis_prefix}-dramatiq"


def build_broker(settings: Settings, *, worker: bool = False) -> dramatiq.Broker:
    if settings.broker_kind == "rabbitmq":
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=settings.broker_url, confirm_delivery=True)
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(
            url=settings.broker_url,
            namespace=dramatiq_namespace(settings),
            heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
            maintenance_chance=settings.broker_maintenance_chance,
            socket_connect_timeout=2,
        )
    broker.add_middleware(AsyncIO())
    if worker:
        from .procmetrics import worker_middleware

        # dramatiq's Prometheus middleware, its exposition adding every worker process's process_*
        broker.add_middleware(worker_middleware())
        broker.add_middleware(WorkerHeartbeat(redis_url=settings.redis_url, prefix=settings.redis_prefix))
    return broker


def setup_broker(settings: Settings, *, worker: bool = False) -> dramatiq.Broker:
    """Build the broker and make it dramatiq's global one (actors bind to it on declaration)."""
    broker = build_broker(settings, worker=worker)
    dramatiq.set_broker(broker)
    return broker
