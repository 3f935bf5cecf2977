"""Health checks: named, each with a timeout, run concurrently.

A check is an async callable returning ``None`` (healthy), a detail string (healthy with a
note), or a :class:`CheckResult`; raising or timing out means it failed. A failed *critical*
check makes the service ``unhealthy`` (HTTP 503); a failed non-critical one, or any check that
reports ``degraded``, makes it ``degraded`` (HTTP 200).

The checks below (database, Redis, SMTP, disk) are the services' own. ``mailgenius status`` is
built on this framework too (:meth:`HealthRegistry.run_results`, :func:`worst`) and runs the
Redis and SMTP checks, so the operator's table and a service's ``/api/health`` judge those
dependencies by the same code.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}

#: probes per second above which a service counts as *busily probed* (a load balancer fleet, a
#: load test); below it every probe gets a round of checks that started after it arrived
BUSY_PROBES_PER_SECOND = 50
#: when busily probed: a result younger than this is served as it is ...
FRESH_SECONDS = 0.25
#: ... and one younger than this is served while a new round (started by that probe) runs;
#: older ones are never served. So under heavy probing a dependency failure shows within
#: FRESH_SECONDS + the round's own time (its checks' timeouts), as without the cache.
STALE_SECONDS = 1.0


@dataclass
class CheckResult:
    status: str = HEALTHY
    detail: str = ""
    latency_ms: float = 0.0
    #: what the check found, structured, for a caller that shows more than the health document
    #: (``mailgenius status`` / ``check``: a relayed service's own checks, Prometheus' targets);
    #: never part of :meth:`as_dict`, so a service's ``/api/health`` answer does not grow with it
    data: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"status": self.status, "latency_ms": round(self.latency_ms, 2), "detail": self.detail}


def worst(statuses) -> str:
    """The worst of some statuses (``healthy`` when there are none): the overall status."""
    overall = HEALTHY
    for status in statuses:
        if _RANK[status] > _RANK[overall]:
            overall = status
    return overall


def is_status(value) -> bool:
    """True for one of the three statuses (``healthy``, ``degraded``, ``unhealthy``)."""
    return value in _RANK


CheckFn = Callable[[], Awaitable["CheckResult | str | None"]]


@dataclass
class HealthCheck:
    name: str
    fn: CheckFn
    critical: bool = True
    timeout: float | None = None


@dataclass
class HealthRegistry:
    service: str
    timeout: float = 1.0
    checks: dict[str, HealthCheck] = field(default_factory=dict)
    gauge: object | None = None  # HttpMetrics.health_up
    #: selection -> the run in progress (see :meth:`run`)
    _inflight: dict = field(default_factory=dict, repr=False)
    #: selection -> (monotonic time its last finished round started, its result)
    _last: dict = field(default_factory=dict, repr=False)
    #: probes counted in the current and the previous whole second (see :meth:`_count_probe`)
    _probe_second: int = field(default=0, repr=False)
    _probes_now: int = field(default=0, repr=False)
    _probes_before: int = field(default=0, repr=False)

    def add(self, name: str, fn: CheckFn, *, critical: bool = True, timeout: float | None = None) -> None:
        self.checks[name] = HealthCheck(name, fn, critical, timeout)

    async def run_one(self, check: HealthCheck) -> CheckResult:
        start = time.perf_counter()
        try:
            out = await _bounded(check.fn(), check.timeout or self.timeout)
        except TimeoutError:
            res = CheckResult(UNHEALTHY if check.critical else DEGRADED,
                              f"timed out after {check.timeout or self.timeout:g}s")
        except Exception as exc:  # a failing dependency is a result, not an error
            res = CheckResult(UNHEALTHY if check.critical else DEGRADED,
                              f"{type(exc).__name__}: {exc}"[:300])
        else:
            if isinstance(out, CheckResult):
                res = out
                if res.status == UNHEALTHY and not check.critical:
                    res.status = DEGRADED
            else:
                res = CheckResult(HEALTHY, out or "")
        res.latency_ms = (time.perf_counter() - start) * 1000
        if self.gauge is not None:
            self.gauge.labels(self.service, check.name).set(1 if res.status == HEALTHY else 0)
        return res

    def _count_probe(self, now: float) -> bool:
        """Count a probe; True when this or the previous second saw BUSY_PROBES_PER_SECOND."""
        second = int(now)
        if second != self._probe_second:
            self._probes_before = self._probes_now if second == self._probe_second + 1 else 0
            self._probe_second, self._probes_now = second, 0
        self._probes_now += 1
        return max(self._probes_now, self._probes_before) >= BUSY_PROBES_PER_SECOND

    async def run(self, names: list[str] | None = None) -> tuple[str, dict[str, dict]]:
        """Run the checks (all by default) and return (overall status, per-check results).

        Concurrent callers of the same selection share one in-flight round (single flight):
        the dependencies see one round of checks at a time, not one per probe.

        A lone probe (an operator, a load balancer probing every few seconds) never gets a
        finished round's result: it joins the round in progress or starts one, so a dependency
        that failed a moment ago shows at once. Under heavy probing (BUSY_PROBES_PER_SECOND,
        e.g. 2,000 probes a second) the last round's result is shared while younger than
        FRESH_SECONDS, then served for up to STALE_SECONDS while the next round runs, never
        older: the answer stays within a second of the truth, each probe costs no I/O, and
        rounds are not re-run back to back for ever (Postgres, Redis and the SMTP relay were
        seeing hundreds of rounds a second).
        """
        key = tuple(names) if names else ()
        now = time.monotonic()
        busy = self._count_probe(now)
        last = self._last.get(key)
        if busy and last is not None and now - last[0] < FRESH_SECONDS:
            return last[1]
        inflight = self._inflight.get(key)
        if inflight is None or inflight.done():
            inflight = asyncio.ensure_future(self._run_and_keep(key, names, now))
            inflight.add_done_callback(consume_outcome)  # nobody may be waiting for it (busy mode)
            self._inflight[key] = inflight
        if busy and last is not None and now - last[0] < STALE_SECONDS:
            return last[1]
        # shielded: a caller that goes away does not cancel the run the others wait for
        return await asyncio.shield(inflight)

    async def _run_and_keep(self, key: tuple, names: list[str] | None, started: float):
        result = await self._run(names)
        self._last[key] = (started, result)
        return result

    async def _run(self, names: list[str] | None) -> tuple[str, dict[str, dict]]:
        overall, results = await self.run_results(names)
        return overall, {name: r.as_dict() for name, r in results.items()}

    async def run_results(self, names: list[str] | None = None) -> tuple[str, dict[str, CheckResult]]:
        """Run the checks (all by default) concurrently, now, with no sharing or caching: (overall
        status, name -> :class:`CheckResult`, in the checks' order). :meth:`run` is this for
        probes; ``mailgenius status`` calls it directly, for the results' ``data`` too."""
        selected = [self.checks[n] for n in (names or list(self.checks))]
        results = await asyncio.gather(*(self.run_one(c) for c in selected))
        return worst(r.status for r in results), {c.name: r for c, r in zip(selected, results, strict=True)}


async def _bounded(coro, timeout: float):
    """``coro``'s result within ``timeout`` seconds, else TimeoutError *at* the deadline.

    Unlike ``asyncio.wait_for`` this does not wait for the cancelled check to unwind: asyncpg
    cancelling a query on a silent (blackholed) connection takes up to its command timeout
    (30 s), and health must answer in about a second. The cancelled task finishes alone."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(consume_outcome)
        raise TimeoutError
    return task.result()


def consume_outcome(task: asyncio.Task) -> None:
    """Done callback for a task nobody may await any more (abandoned past its deadline, or
    shared by waiters that all went away): its exception is retrieved, so asyncio does not log
    "exception was never retrieved" when it is garbage collected."""
    if not task.cancelled():
        task.exception()


# -- reusable checks ---------------------------------------------------------------------------

def database_check(get_pool) -> CheckFn:
    async def check():
        pool = get_pool()
        async with pool.acquire(timeout=1.0) as conn:
            await conn.fetchval("SELECT 1")
        return f"pool {pool.get_size()} connections ({pool.get_idle_size()} idle)"

    return check


def redis_check(get_client) -> CheckFn:
    async def check():
        await get_client().ping()

    return check


async def smtp_reachable(host: str, port: int, timeout: float = 2.0) -> str:
    """Connect to an SMTP server, read its 220 greeting, NOOP and QUIT; raise when it does not
    answer so (an ``aiosmtplib`` error naming the host and port)."""
    import aiosmtplib

    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=timeout, start_tls=False, use_tls=False)
    try:
        await client.connect()
        await client.noop()
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            pass
    finally:
        client.close()
    return f"smtp {host}:{port} reachable"


def smtp_check(host: str, port: int, timeout: float = 2.0) -> CheckFn:
    """Health check: the SMTP server at ``host:port`` greets and answers (:func:`smtp_reachable`,
    what the sender's email check does for its relay)."""

    async def check():
        return await smtp_reachable(host, port, timeout)

    return check


def disk_check(path: str, *, min_free_bytes: int = 1 << 30, degraded_ratio: float = 0.10) -> CheckFn:
    """Free space of the folder holding ``path``: unhealthy below ``min_free_bytes``, degraded
    below ``degraded_ratio`` of the disk."""

    async def check():
        import os

        os.makedirs(path, exist_ok=True)
        usage = shutil.disk_usage(path)
        detail = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"
        if usage.free < min_free_bytes:
            return CheckResult(UNHEALTHY, detail)
        if usage.free / usage.total < degraded_ratio:
            return CheckResult(DEGRADED, detail)
        return detail

    return check
