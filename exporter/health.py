"""The exporter's ``/api/health`` aggregates the whole system: its own Postgres and Redis
(critical, from the kernel), the broker's queues (critical), live workers, the sender and importer
services (their own ``/api/health``), Prometheus and Alertmanager (``/-/healthy``). A down
service or monitoring component makes the answer ``degraded``, not ``unhealthy``: the exporter
itself still works and says precisely what is missing."""

from __future__ import annotations

import aiohttp

from mailgenius import contract
from mailgenius import metrics as m
from mailgenius.health import DEGRADED, HEALTHY, UNHEALTHY, CheckResult, HealthRegistry
from mailgenius.queues import worker_count
from mailgenius.settings import ExporterSettings

from .brokers import queue_stats


def queue_depth_degraded() -> float:
    """Waiting messages above which the queue check reports degraded: QueueDepthHigh's
    threshold, from the contract (alerting/rules.yml)."""
    return contract.get().threshold("queue_waiting_messages")


def service_check(get_session, base_url: str, timeout: float, path: str = "/api/health"):
    """Another MailGenius service's own aggregated health (or one of its checks), relayed."""

    async def check():
        url = base_url.rstrip("/") + path
        async with get_session().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                return CheckResult(UNHEALTHY, f"HTTP {resp.status}, not a health document")
        status = body.get("status") if isinstance(body, dict) else None
        if status not in (HEALTHY, DEGRADED, UNHEALTHY):
            return CheckResult(UNHEALTHY, f"HTTP {resp.status}, unknown status {status!r}")
        failing = sorted(name for name, c in (body.get("checks") or {}).items()
                         if isinstance(c, dict) and c.get("status") != HEALTHY)
        detail = f"{status}" + (f" ({', '.join(failing)})" if failing else "")
        return CheckResult(status, detail)

    return check


def http_up_check(get_session, url: str, timeout: float):
    """Prometheus / Alertmanager: ``/-/healthy`` answers 200."""

    async def check():
        async with get_session().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return CheckResult(UNHEALTHY, f"{url}: HTTP {resp.status}")
        return None

    return check


def queues_check(get_redis, settings):
    async def check():
        parts, status = [], HEALTHY
        limit = queue_depth_degraded()
        for q in m.QUEUES:
            st = await queue_stats(settings, get_redis(), q)
            parts.append(f"{q}: {st.waiting} waiting, {st.delayed} delayed, {st.dead} dead")
            if st.waiting > limit:
                status = DEGRADED
                parts[-1] += f" (more than {limit:g})"
        return CheckResult(status, "; ".join(parts))

    return check


def all_workers_check(get_redis, settings, config: ExporterSettings):
    """Unhealthy when a queue has waiting messages and no live worker; degraded when a queue has
    no live worker at all."""

    async def check():
        parts, status = [], HEALTHY
        for q in m.QUEUES:
            n = await worker_count(get_redis(), settings.redis_prefix, q,
                                   stale_after=config.worker_stale_seconds)
            parts.append(f"{q}: {n}")
            if n == 0:
                waiting = (await queue_stats(settings, get_redis(), q)).waiting
                if waiting:
                    status = UNHEALTHY
                    parts[-1] += f" ({waiting} waiting)"
                elif status == HEALTHY:
                    status = DEGRADED
        return CheckResult(status, "live workers: " + ", ".join(parts))

    return check


def add_checks(health: HealthRegistry, *, settings, config: ExporterSettings, get_redis, get_session) -> None:
    t = config.http_timeout
    health.add("queue", queues_check(get_redis, settings))
    health.add("workers", all_workers_check(get_redis, settings, config), critical=False)
    health.add("sender", service_check(get_session, settings.sender_url, t), critical=False, timeout=t + 0.5)
    health.add("importer", service_check(get_session, settings.importer_url, t), critical=False, timeout=t + 0.5)
    # the operations guide's /api/health/email and /api/health/upload, answered here too: the
    # sender's email-provider check and the importer's upload-directory check, relayed
    health.add("email", service_check(get_session, settings.sender_url, t, "/api/health/email"),
               critical=False, timeout=t + 0.5)
    health.add("upload", service_check(get_session, settings.importer_url, t, "/api/health/upload"),
               critical=False, timeout=t + 0.5)
    health.add("prometheus", http_up_check(get_session, settings.prometheus_url.rstrip("/") + "/-/healthy", t),
               critical=False, timeout=t + 0.5)
    health.add("alertmanager", http_up_check(get_session, settings.alertmanager_url.rstrip("/") + "/-/healthy", t),
               critical=False, timeout=t + 0.5)
