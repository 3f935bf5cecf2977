"""``mailgenius status`` (one table of every service and dependency; exit 1 when unhealthy) and
``mailgenius check NAME`` (one of them, in detail).

Every component is a check of the kernel's health framework (:mod:`mailgenius.health`): a
:class:`~mailgenius.health.HealthRegistry` runs them concurrently, each within
:data:`PROBE_TIMEOUT`, and a check that raises or times out is ``unhealthy``, exactly as for a
service's ``/api/health``. Where a service checks the same thing, status runs the same function:

* sender, importer, exporter: the exporter's :func:`exporter.health.service_check` (their own
  ``/api/health`` relayed, with ``MAILGENIUS_API_KEY`` to see their checks);
* Prometheus and Alertmanager: the exporter's :func:`exporter.health.http_up_check` on
  ``/-/healthy``, then the targets that are down and the active alerts;
* the SMTP relay (the sink): the kernel's :func:`mailgenius.health.smtp_check`, the sender's
  email check's own; a second broker Redis: the kernel's :func:`mailgenius.health.redis_check`.

What only the console looks at has its check here: Postgres' connections against
``max_connections``, Redis' memory, RabbitMQ's port, the workers' and exporters' ``/metrics``.
A queue row's status follows the sender's and importer's own queue and workers checks
(:func:`mailgenius.queues.waiting_status`, :func:`~mailgenius.queues.workers_status`): degraded
above QueueDepthHigh's threshold (from the contract) or with no live worker, unhealthy when
messages wait and no worker is alive.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any
from urllib.parse import urlencode, urlparse

from exporter.health import http_up_check, service_check
from mailgenius import contract
from mailgenius.components import BY_NAME
from mailgenius.health import (
    DEGRADED,
    HEALTHY,
    UNHEALTHY,
    CheckFn,
    CheckResult,
    HealthRegistry,
    redis_check,
    smtp_check,
    worst,
)
from mailgenius.settings import Settings

from .base import format_table
from .stack import ops_env, ops_settings

# -- status and check -------------------------------------------------------------------------

#: seconds one check may take before it counts as failed
PROBE_TIMEOUT = 3.0

#: every component, in the table's order, and its kind
KINDS = {"sender": "service", "importer": "service", "exporter": "service",
         "sender-worker": "worker", "importer-worker": "worker",
         "postgres": "dependency", "redis": "dependency", "broker": "dependency", "smtp-sink": "dependency",
         "prometheus": "monitoring", "postgres-exporter": "monitoring", "redis-exporter": "monitoring",
         "node-exporter": "monitoring", "alertmanager": "monitoring"}


def _timeout():
    import aiohttp

    return aiohttp.ClientTimeout(total=PROBE_TIMEOUT)


def metrics_check(get_session, url: str, *, up_metric: str | None = None) -> CheckFn:
    """An exposition endpoint answers (and, for exporters, says it reaches its target)."""

    async def check():
        async with get_session().get(url, timeout=_timeout()) as resp:
            status, text = resp.status, await resp.text()
        if status != 200:
            return CheckResult(UNHEALTHY, f"{url}: HTTP {status}")
        samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        if up_metric:
            m = re.search(rf"^{re.escape(up_metric)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
            if not m or float(m.group(1)) != 1.0:
                return CheckResult(UNHEALTHY, f"{up_metric} is {m.group(1) if m else 'missing'}: "
                                              "the exporter cannot reach its target")
        return f"{samples} samples"

    return check


def postgres_check(settings: Settings) -> CheckFn:
    """Connections in use against ``max_connections``: degraded above DatabaseConnectionsHigh's
    own threshold (a share of max_connections, from the contract)."""

    async def check():
        import asyncpg

        conn = await asyncpg.connect(settings.database_url, timeout=PROBE_TIMEOUT)
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM pg_stat_activity) AS conns, "
                "current_setting('max_connections')::int AS max_conns")
        finally:
            await conn.close()
        high = row["conns"] > contract.get().threshold("postgres_connections_ratio") * row["max_conns"]
        return CheckResult(DEGRADED if high else HEALTHY, f"{row['conns']}/{row['max_conns']} connections",
                           data=dict(row))

    return check


def redis_memory_check(get_redis) -> CheckFn:
    """Memory used, degraded above 90 % of ``maxmemory`` (when one is set)."""

    async def check():
        info = await get_redis().info("memory")
        used, maxmem = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        detail = f"{used / 2**20:.1f} MiB used" + (f" of {maxmem / 2**20:.0f} MiB" if maxmem else "")
        return CheckResult(DEGRADED if maxmem and used > 0.9 * maxmem else HEALTHY, detail)

    return check


def broker_check(settings: Settings) -> CheckFn:
    """The broker: Redis (pinged when it is not the Redis checked already), or RabbitMQ's AMQP
    port accepting connections (workers on many hosts use it)."""

    async def check():
        if settings.broker_kind == "redis":
            if settings.broker_url == settings.redis_url:
                return "Redis (same as redis)"
            import redis.asyncio as aioredis

            client = aioredis.from_url(settings.broker_url, socket_connect_timeout=PROBE_TIMEOUT)
            try:
                await redis_check(lambda: client)()
            finally:
                await client.aclose()
            return "Redis"
        p = urlparse(settings.broker_url)
        where = f"RabbitMQ at {p.hostname}:{p.port or 5672}"
        try:
            _reader, writer = await asyncio.open_connection(p.hostname, p.port or 5672)
        except OSError as exc:
            raise ConnectionError(f"{where}: {type(exc).__name__} {exc}") from exc
        writer.close()
        await writer.wait_closed()
        return f"{where} accepts connections"

    return check


def prometheus_check(get_session, url: str) -> CheckFn:
    """``/-/healthy`` (the exporter's check), then the active targets: degraded when one is not up."""
    healthy = http_up_check(get_session, url.rstrip("/") + "/-/healthy", PROBE_TIMEOUT)

    async def check():
        res = await healthy()
        if res is not None:
            return res
        async with get_session().get(url + "/api/v1/targets?state=active", timeout=_timeout()) as resp:
            body = await resp.json(content_type=None)
        targets = body["data"]["activeTargets"]
        down = sorted({t["labels"].get("job", "?") for t in targets if t["health"] != "up"})
        detail = f"{len(targets) - len([t for t in targets if t['health'] != 'up'])}/{len(targets)} targets up"
        if down:
            detail += f" (not up: {', '.join(down)})"
        return CheckResult(DEGRADED if down else HEALTHY, detail, data={"targets": len(targets), "down": down})

    return check


def alertmanager_check(get_session, url: str) -> CheckFn:
    """``/-/healthy`` (the exporter's check), then the active alerts (in ``data["alerts"]``)."""
    healthy = http_up_check(get_session, url.rstrip("/") + "/-/healthy", PROBE_TIMEOUT)

    async def check():
        res = await healthy()
        if res is not None:
            return res
        query = urlencode({"active": "true", "silenced": "false", "inhibited": "false"})
        async with get_session().get(url + "/api/v2/alerts?" + query, timeout=_timeout()) as resp:
            alerts = await resp.json(content_type=None)
        return CheckResult(HEALTHY, f"{len(alerts)} active alert(s)", data={"alerts": alerts})

    return check


def _service_detail(checks: dict) -> str:
    """A relayed service's checks in one line: those not healthy, with their details."""
    bad = [f"{n}: {c.get('status')} ({c.get('detail', '')})" for n, c in checks.items() if c.get("status") != HEALTHY]
    return "; ".join(bad) if bad else "checks ok: " + ", ".join(checks)


def component_checks(settings: Settings, env: dict[str, str], get_session, get_redis) -> dict[str, CheckFn]:
    """name -> check of every component, in the order of :data:`KINDS`."""
    host = env.get("MAILGENIUS_HOST", "127.0.0.1")

    def metrics_url(name: str) -> str:
        return f"http://{host}:{int(env.get(BY_NAME[name].env) or BY_NAME[name].default)}/metrics"

    # health shows its details only to a key holder (MAILGENIUS_API_KEY, any scope; from the
    # environment the command runs in, completed by the stack's stack.env like every other value)
    key = env.get("MAILGENIUS_API_KEY", "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return {
        "sender": service_check(get_session, settings.sender_url, PROBE_TIMEOUT, headers=headers),
        "importer": service_check(get_session, settings.importer_url, PROBE_TIMEOUT, headers=headers),
        "exporter": service_check(get_session, settings.exporter_url, PROBE_TIMEOUT, headers=headers),
        "sender-worker": metrics_check(get_session, metrics_url("sender-worker")),
        "importer-worker": metrics_check(get_session, metrics_url("importer-worker")),
        "postgres": postgres_check(settings),
        "redis": redis_memory_check(get_redis),
        "broker": broker_check(settings),
        "smtp-sink": smtp_check(settings.smtp_host, settings.smtp_port, timeout=PROBE_TIMEOUT),
        "prometheus": prometheus_check(get_session, settings.prometheus_url),
        "postgres-exporter": metrics_check(get_session, metrics_url("postgres-exporter"), up_metric="pg_up"),
        "redis-exporter": metrics_check(get_session, metrics_url("redis-exporter"), up_metric="redis_up"),
        "node-exporter": metrics_check(get_session, metrics_url("node-exporter")),
        "alertmanager": alertmanager_check(get_session, settings.alertmanager_url),
    }


def _component(name: str, res: CheckResult) -> dict:
    data = dict(res.data)
    detail = _service_detail(data["checks"]) if KINDS[name] == "service" and "checks" in data else res.detail
    return {"name": name, "kind": KINDS[name], "status": res.status, "latency_ms": round(res.latency_ms, 1),
            "detail": detail, **({"data": data} if data else {})}


async def queue_rows(settings: Settings, redis) -> list[dict]:
    from mailgenius.broker import dramatiq_namespace
    from mailgenius.metrics import QUEUES
    from mailgenius.queues import redis_queue_stats, waiting_status, worker_count, workers_status

    rows = []
    for queue in QUEUES:
        row: dict[str, Any] = {"queue": queue}
        try:
            row["workers"] = await worker_count(redis, settings.redis_prefix, queue)
            if settings.broker_kind == "redis":
                stats = await redis_queue_stats(redis, dramatiq_namespace(settings), queue)
                row.update(waiting=stats.waiting, delayed=stats.delayed, dead=stats.dead,
                           oldest_age_seconds=round(stats.oldest_age_seconds, 1))
            # the services' own queue and workers checks' rules (mailgenius.queues)
            waiting = row.get("waiting", 0)
            row["status"] = worst([waiting_status(waiting), workers_status(row["workers"], waiting)])
        except Exception as exc:
            row.update(status=UNHEALTHY, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


async def collect_status(env: dict[str, str], only: str | None = None) -> dict:
    """Check everything (or one thing) concurrently."""
    import aiohttp

    from mailgenius.cache import create_redis

    settings = ops_settings(env)
    redis = create_redis(settings.redis_url)
    try:
        async with aiohttp.ClientSession() as session:
            registry = HealthRegistry(service="console", timeout=PROBE_TIMEOUT)
            for name, fn in component_checks(settings, env, lambda: session, lambda: redis).items():
                if only is None or only == name:
                    registry.add(name, fn)
            want_queues = only in (None, "queues", "queue", "workers")
            checked = registry.run_results() if registry.checks else _nothing()
            (_, results), queues = await asyncio.gather(
                checked, queue_rows(settings, redis) if want_queues else _nothing_listed())
    finally:
        await redis.aclose()
    alerts = None
    if "alertmanager" in results:
        alerts = results["alertmanager"].data.pop("alerts", None)
    components = [_component(name, res) for name, res in results.items()]
    overall = worst([c["status"] for c in components] + [q["status"] for q in queues])
    return {"status": overall, "components": components, "queues": queues,
            "alerts": [_alert_row(a) for a in alerts] if alerts is not None else None}


async def _nothing() -> tuple[str, dict]:
    return HEALTHY, {}


async def _nothing_listed() -> list:
    return []


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
             f"{c['latency_ms']:.1f} ms", c["detail"][:110]]
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
        print(f"{comp['name']}: {comp['status']} in {comp['latency_ms']:.1f} ms")
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
