"""``mailgenius status`` (one table of every service and dependency; exit 1 when unhealthy) and
``mailgenius check NAME`` (one of them, in detail).

The statuses and their order are the kernel's health framework's (:mod:`mailgenius.health`); a
queue is degraded above the exporter's own queue check threshold (QueueDepthHigh's, from the contract).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlparse

from exporter.health import queue_depth_degraded
from mailgenius import contract
from mailgenius.components import BY_NAME
from mailgenius.health import _RANK, DEGRADED, HEALTHY, UNHEALTHY
from mailgenius.settings import Settings

from .base import format_table
from .stack import ops_env, ops_settings

# -- status and check -------------------------------------------------------------------------

#: seconds one probe may take before it counts as failed
PROBE_TIMEOUT = 3.0


@dataclass
class Probe:
    """The result of probing one service or dependency."""

    name: str
    kind: str  # service, worker, dependency, monitoring
    status: str = HEALTHY
    latency_ms: float | None = None
    detail: str = ""
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "status": self.status,
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
                "detail": self.detail, **({"data": self.data} if self.data else {})}


async def _timed(coro):
    start = time.perf_counter()
    result = await coro
    return result, (time.perf_counter() - start) * 1000


async def _http_json(session, url: str, **kw):
    import aiohttp

    async with session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT), **kw) as resp:
        text = await resp.text()
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        return resp.status, body


async def probe_service(session, name: str, base_url: str) -> Probe:
    probe = Probe(name, "service")
    try:
        # health shows its details only to a key holder (MAILGENIUS_API_KEY, any scope)
        key = os.environ.get("MAILGENIUS_API_KEY", "").strip()
        (status, body), probe.latency_ms = await _timed(_http_json(
            session, base_url + "/api/health", headers={"Authorization": f"Bearer {key}"} if key else {}))
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{base_url} unreachable: {type(exc).__name__} {exc}".strip()
        return probe
    if not isinstance(body, dict) or body.get("status") not in _RANK:
        probe.status, probe.detail = UNHEALTHY, f"HTTP {status}: not a health document"
        return probe
    probe.status = body["status"]
    checks = body.get("checks") or {}
    probe.data = {"checks": checks}
    bad = [f"{n}: {c.get('status')} ({c.get('detail', '')})" for n, c in checks.items() if c.get("status") != HEALTHY]
    probe.detail = "; ".join(bad) if bad else "checks ok: " + ", ".join(checks)
    return probe


async def probe_metrics(session, name: str, url: str, kind: str, *, up_metric: str | None = None) -> Probe:
    """An exposition endpoint answers (and, for exporters, says it reaches its target)."""
    import aiohttp

    probe = Probe(name, kind)
    try:
        async def get():
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as resp:
                return resp.status, await resp.text()

        (status, text), probe.latency_ms = await _timed(get())
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{url} unreachable: {type(exc).__name__} {exc}".strip()
        return probe
    if status != 200:
        probe.status, probe.detail = UNHEALTHY, f"{url}: HTTP {status}"
        return probe
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    probe.detail = f"{samples} samples"
    if up_metric:
        m = re.search(rf"^{re.escape(up_metric)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        if not m or float(m.group(1)) != 1.0:
            probe.status = UNHEALTHY
            probe.detail = f"{up_metric} is {m.group(1) if m else 'missing'}: the exporter cannot reach its target"
    return probe


async def probe_postgres(settings: Settings) -> Probe:
    import asyncpg

    probe = Probe("postgres", "dependency")
    try:
        async def q():
            conn = await asyncpg.connect(settings.database_url, timeout=PROBE_TIMEOUT)
            try:
                return await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM pg_stat_activity) AS conns, "
                    "current_setting('max_connections')::int AS max_conns")
            finally:
                await conn.close()

        row, probe.latency_ms = await _timed(asyncio.wait_for(q(), PROBE_TIMEOUT))
        probe.detail = f"{row['conns']}/{row['max_conns']} connections"
        probe.data = dict(row)
        # DatabaseConnectionsHigh's own threshold (a share of max_connections)
        if row["conns"] > contract.get().threshold("postgres_connections_ratio") * row["max_conns"]:
            probe.status = DEGRADED
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{type(exc).__name__}: {exc}"
    return probe


async def probe_redis(settings: Settings, redis) -> Probe:
    probe = Probe("redis", "dependency")
    try:
        info, probe.latency_ms = await _timed(asyncio.wait_for(redis.info("memory"), PROBE_TIMEOUT))
        used = int(info.get("used_memory", 0))
        maxmem = int(info.get("maxmemory", 0))
        probe.detail = f"{used / 2**20:.1f} MiB used" + (f" of {maxmem / 2**20:.0f} MiB" if maxmem else "")
        if maxmem and used > 0.9 * maxmem:
            probe.status = DEGRADED
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{type(exc).__name__}: {exc}"
    return probe


async def probe_broker(settings: Settings) -> Probe:
    probe = Probe("broker", "dependency")
    if settings.broker_kind == "redis":
        probe.detail = "Redis (same as redis)" if settings.broker_url == settings.redis_url else "Redis"
        if settings.broker_url != settings.redis_url:
            import redis.asyncio as aioredis

            client = aioredis.from_url(settings.broker_url, socket_connect_timeout=PROBE_TIMEOUT)
            try:
                _, probe.latency_ms = await _timed(client.ping())
            except Exception as exc:
                probe.status, probe.detail = UNHEALTHY, f"{type(exc).__name__}: {exc}"
            finally:
                await client.aclose()
        return probe
    p = urlparse(settings.broker_url)
    try:
        (_reader, writer), probe.latency_ms = await _timed(asyncio.wait_for(
            asyncio.open_connection(p.hostname, p.port or 5672), PROBE_TIMEOUT))
        writer.close()
        await writer.wait_closed()
        probe.detail = f"RabbitMQ at {p.hostname}:{p.port or 5672} accepts connections"
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"RabbitMQ at {p.hostname}:{p.port or 5672}: {type(exc).__name__} {exc}"
    return probe


async def probe_smtp(host: str, port: int) -> Probe:
    probe = Probe("smtp-sink", "dependency")
    try:
        async def hello():
            reader, writer = await asyncio.open_connection(host, port)
            try:
                banner = await reader.readline()
                writer.write(b"QUIT\r\n")
                await writer.drain()
                return banner.decode(errors="replace").strip()
            finally:
                writer.close()

        banner, probe.latency_ms = await _timed(asyncio.wait_for(hello(), PROBE_TIMEOUT))
        if not banner.startswith("220"):
            probe.status = UNHEALTHY
        probe.detail = f"{host}:{port} says {banner[:60]!r}"
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{host}:{port} unreachable: {type(exc).__name__} {exc}".strip()
    return probe


async def probe_prometheus(session, url: str) -> Probe:
    probe = Probe("prometheus", "monitoring")
    try:
        (status, _), probe.latency_ms = await _timed(_http_json(session, url + "/-/healthy"))
        if status != 200:
            probe.status, probe.detail = UNHEALTHY, f"/-/healthy: HTTP {status}"
            return probe
        _, body = await _http_json(session, url + "/api/v1/targets?state=active")
        targets = body["data"]["activeTargets"]
        down = sorted({t["labels"].get("job", "?") for t in targets if t["health"] != "up"})
        probe.data = {"targets": len(targets), "down": down}
        probe.detail = f"{len(targets) - len([t for t in targets if t['health'] != 'up'])}/{len(targets)} targets up"
        if down:
            probe.status = DEGRADED
            probe.detail += f" (not up: {', '.join(down)})"
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{url} unreachable: {type(exc).__name__} {exc}".strip()
    return probe


async def probe_alertmanager(session, url: str) -> tuple[Probe, list[dict] | None]:
    probe = Probe("alertmanager", "monitoring")
    try:
        (status, _), probe.latency_ms = await _timed(_http_json(session, url + "/-/healthy"))
        if status != 200:
            probe.status, probe.detail = UNHEALTHY, f"/-/healthy: HTTP {status}"
            return probe, None
        _, alerts = await _http_json(session, url + "/api/v2/alerts?" + urlencode(
            {"active": "true", "silenced": "false", "inhibited": "false"}))
        probe.detail = f"{len(alerts)} active alert(s)"
        return probe, alerts
    except Exception as exc:
        probe.status, probe.detail = UNHEALTHY, f"{url} unreachable: {type(exc).__name__} {exc}".strip()
        return probe, None


async def queue_rows(settings: Settings, redis) -> list[dict]:
    from mailgenius.broker import dramatiq_namespace
    from mailgenius.metrics import QUEUES
    from mailgenius.queues import redis_queue_stats, worker_count

    rows = []
    for queue in QUEUES:
        row: dict[str, Any] = {"queue": queue}
        try:
            row["workers"] = await worker_count(redis, settings.redis_prefix, queue)
            if settings.broker_kind == "redis":
                stats = await redis_queue_stats(redis, dramatiq_namespace(settings), queue)
                row.update(waiting=stats.waiting, delayed=stats.delayed, dead=stats.dead,
                           oldest_age_seconds=round(stats.oldest_age_seconds, 1))
            status = HEALTHY
            if row.get("waiting", 0) and not row["workers"]:
                status = UNHEALTHY
            elif row.get("waiting", 0) > queue_depth_degraded() or not row["workers"]:
                status = DEGRADED
            row["status"] = status
        except Exception as exc:
            row.update(status=UNHEALTHY, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


async def collect_status(env: dict[str, str], only: str | None = None) -> dict:
    """Probe everything (or one thing) concurrently."""
    import aiohttp

    from mailgenius.cache import create_redis

    settings = ops_settings(env)
    host = env.get("MAILGENIUS_HOST", "127.0.0.1")

    def port(name: str) -> int:
        return int(env.get(BY_NAME[name].env) or BY_NAME[name].default)

    redis = create_redis(settings.redis_url)
    try:
        async with aiohttp.ClientSession() as session:
            tasks: dict[str, Any] = {
                "sender": lambda: probe_service(session, "sender", settings.sender_url),
                "importer": lambda: probe_service(session, "importer", settings.importer_url),
                "exporter": lambda: probe_service(session, "exporter", settings.exporter_url),
                "sender-worker": lambda: probe_metrics(session, "sender-worker", f"http://{host}:{port('sender-worker')}/metrics", "worker"),
                "importer-worker": lambda: probe_metrics(session, "importer-worker", f"http://{host}:{port('importer-worker')}/metrics", "worker"),
                "postgres": lambda: probe_postgres(settings),
                "redis": lambda: probe_redis(settings, redis),
                "broker": lambda: probe_broker(settings),
                "smtp-sink": lambda: probe_smtp(settings.smtp_host, settings.smtp_port),
                "prometheus": lambda: probe_prometheus(session, settings.prometheus_url),
                "postgres-exporter": lambda: probe_metrics(session, "postgres-exporter", f"http://{host}:{port('postgres-exporter')}/metrics", "monitoring", up_metric="pg_up"),
                "redis-exporter": lambda: probe_metrics(session, "redis-exporter", f"http://{host}:{port('redis-exporter')}/metrics", "monitoring", up_metric="redis_up"),
                "node-exporter": lambda: probe_metrics(session, "node-exporter", f"http://{host}:{port('node-exporter')}/metrics", "monitoring"),
            }
            want_am = only in (None, "alertmanager", "alerts")
            want_queues = only in (None, "queues", "queue", "workers")
            if only is not None:
                tasks = {k: v for k, v in tasks.items() if k == only}
            coros = [fn() for fn in tasks.values()]
            if want_am:
                coros.append(probe_alertmanager(session, settings.alertmanager_url))
            if want_queues:
                coros.append(queue_rows(settings, redis))
            results = list(await asyncio.gather(*coros))
    finally:
        await redis.aclose()
    queues = results.pop() if want_queues else []
    alerts = None
    probes: list[Probe] = []
    if want_am:
        am_probe, alerts = results.pop()
        probes = results + [am_probe]
    else:
        probes = results
    overall = HEALTHY
    for p in probes:
        if _RANK[p.status] > _RANK[overall]:
            overall = p.status
    for q in queues:
        if _RANK[q["status"]] > _RANK[overall]:
            overall = q["status"]
    return {"status": overall, "components": [p.as_dict() for p in probes], "queues": queues,
            "alerts": [_alert_row(a) for a in alerts] if alerts is not None else None}


def _alert_row(alert: dict) -> dict:
    labels = alert.get("labels", {})
    return {"alertname": labels.get("alertname", "?"), "severity": labels.get("severity", ""),
            "service": labels.get("service", ""), "startsAt": alert.get("startsAt", ""),
            "summary": (alert.get("annotations") or {}).get("summary", "")}


def _mark(status: str) -> str:
    # status is spelled out, never told by colour alone
    return {HEALTHY: "ok  healthy", DEGRADED: "!   degraded", UNHEALTHY: "XX  unhealthy"}.get(status, status)


def render_status(report: dict) -> str:
    parts = []
    rows = [[c["name"], c["kind"], _mark(c["status"]),
             "-" if c["latency_ms"] is None else f"{c['latency_ms']:.1f} ms", c["detail"][:110]]
            for c in report["components"]]
    parts.append(format_table(rows, ["COMPONENT", "KIND", "STATUS", "LATENCY", "DETAIL"]))
    if report["queues"]:
        qrows = [[q["queue"], _mark(q["status"]), q.get("waiting", "-"), q.get("delayed", "-"), q.get("dead", "-"),
                  q.get("workers", "-"), f"{q['oldest_age_seconds']:.0f} s" if "oldest_age_seconds" in q else "-",
                  q.get("error", "")] for q in report["queues"]]
        parts.append(format_table(qrows, ["QUEUE", "STATUS", "WAITING", "DELAYED", "DEAD", "WORKERS", "OLDEST", ""]))
    alerts = report["alerts"]
    if alerts is None:
        parts.append("ACTIVE ALERTS: unknown (Alertmanager unreachable)")
    elif not alerts:
        parts.append("ACTIVE ALERTS: none")
    else:
        arows = [[a["alertname"], a["severity"], a["service"], a["startsAt"][:19], a["summary"][:80]] for a in alerts]
        parts.append(f"ACTIVE ALERTS ({len(alerts)})\n" + format_table(arows, ["ALERT", "SEVERITY", "SERVICE", "SINCE", "SUMMARY"]))
    parts.append(f"OVERALL: {report['status']}")
    return "\n\n".join(parts)


def cmd_status(args) -> int:
    env = ops_env()
    report = asyncio.run(collect_status(env))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_status(report))
    if report["status"] == UNHEALTHY or (args.strict and report["status"] != HEALTHY):
        return 1
    return 0


#: names `mailgenius check` accepts beyond the component names, and what they mean
CHECK_ALIASES = {"database": "postgres", "db": "postgres", "queue": "queues", "workers": "queues",
                 "alerts": "alertmanager", "sink": "smtp-sink", "smtp": "smtp-sink"}
CHECK_NAMES = ("sender", "importer", "exporter", "sender-worker", "importer-worker", "postgres", "redis",
               "broker", "smtp-sink", "prometheus", "alertmanager", "postgres-exporter", "redis-exporter",
               "node-exporter", "queues")


def cmd_check(args) -> int:
    name = CHECK_ALIASES.get(args.service, args.service)
    if name not in CHECK_NAMES:
        print(f"mailgenius: unknown service {args.service!r}; choose from "
              f"{', '.join(CHECK_NAMES + tuple(CHECK_ALIASES))}", file=sys.stderr)
        return 2
    env = ops_env()
    report = asyncio.run(collect_status(env, only=name))
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if report["status"] == UNHEALTHY else 0
    for comp in report["components"]:
        lat = "" if comp["latency_ms"] is None else f" in {comp['latency_ms']:.1f} ms"
        print(f"{comp['name']}: {comp['status']}{lat}")
        checks = (comp.get("data") or {}).get("checks")
        if checks:
            rows = [[n, _mark(c.get("status", "?")), f"{c.get('latency_ms', 0):.1f} ms", c.get("detail", "")] for n, c in checks.items()]
            print(format_table(rows, ["CHECK", "STATUS", "LATENCY", "DETAIL"]))
        else:
            print(f"  {comp['detail']}")
    if name == "queues":
        print(render_status({**report, "components": [], "alerts": []}).split("\n\nACTIVE")[0])
    if name == "alertmanager" and report["alerts"]:
        for a in report["alerts"]:
            print(f"  firing: {a['alertname']} [{a['severity']}] {a['service']} since {a['startsAt'][:19]}: {a['summary']}")
    print(f"status: {report['status']}")
    return 1 if report["status"] == UNHEALTHY else 0
