"""The one Prometheus HTTP API client (asyncio): instant and range queries, with one error type.

Every reader of Prometheus (the operator summary, the monitoring page, the report, the exporter)
goes through :class:`Prometheus`, so a query fails the same way everywhere:
:class:`PrometheusError`, whose ``unreachable`` says whether Prometheus did not answer (down,
timeout, not JSON, HTTP 5xx) or answered and rejected the query (bad PromQL, HTTP 4xx).

    async with Prometheus("http://127.0.0.1:9090") as prom:      # its own session
        p95 = await prom.scalar(":mailgenius_http_request_duration_seconds:p95_rate5m")
    prom = Prometheus(url, session=app_session)                    # a shared aiohttp session

Values that are NaN or infinite (0/0 ratios, quantiles without data) come back as None.
"""

from __future__ import annotations

import math
from typing import Any

import aiohttp

#: seconds to wait for one answer before saying Prometheus is unreachable
DEFAULT_TIMEOUT = 5.0


class PrometheusError(Exception):
    """A query failed. ``unreachable``: Prometheus did not answer usefully (vs. rejected it)."""

    def __init__(self, message: str, *, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


def finite(value) -> float | None:
    """A sample value as a float, None for NaN, infinities and garbage."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class Prometheus:
    """Client of one Prometheus. ``queries`` lists every expression sent (the report prints it)."""

    def __init__(self, url: str, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = session
        self._own = session is None
        self.queries: list[str] = []

    async def __aenter__(self) -> Prometheus:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def get(self, path: str, params: dict | None = None) -> Any:
        """``data`` of one API answer (``path`` like ``/api/v1/query``)."""
        url = self.url + path
        what = (params or {}).get("query", path)
        try:
            async with self._http().get(url, params=params,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                status = resp.status
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} is unreachable: {type(exc).__name__}: {exc}"[:300],
                                  unreachable=True) from None
        if not isinstance(body, dict):
            raise PrometheusError(f"Prometheus at {self.url} answered HTTP {status}, not JSON", unreachable=True)
        if body.get("status") != "success":
            rejected = 400 <= status < 500 and status not in (401, 403, 404)
            raise PrometheusError(f"Prometheus {'rejected' if rejected else 'failed'} {what!r}: "
                                  f"HTTP {status} {body.get('error', '')}"[:300], unreachable=not rejected)
        return body.get("data")

    async def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query: the result vector."""
        self.queries.append(expr)
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return (await self.get("/api/v1/query", params))["result"]

    async def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The value of the first series (None when there is none or it is NaN)."""
        res = await self.query(expr, at)
        return finite(res[0]["value"][1]) if res else None

    async def by(self, expr: str, label: str, at: float | None = None) -> dict[str, float]:
        """label value -> value, finite values only."""
        out = {}
        for r in await self.query(expr, at):
            v = finite(r["value"][1])
            if v is not None:
                out[r["metric"].get(label, "")] = v
        return out

    async def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        self.queries.append(expr)
        return (await self.get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                        "end": f"{end:.3f}", "step": f"{step:.3f}"}))["result"]

    async def head_min_time(self) -> float | None:
        """Seconds of the oldest sample in the head block (None when unknown)."""
        try:
            data = await self.get("/api/v1/status/tsdb")
            return data["headStats"]["minTime"] / 1000.0
        except (PrometheusError, KeyError, TypeError):
            return None
