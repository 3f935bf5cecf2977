"""Prometheus range queries (a fixed allow-list: the browser never sends PromQL) and
Alertmanager's active alerts.

Either backend being down is an answer, not an error: the JSON says ``{"ok": false, "error":
"Prometheus unreachable: ..."}`` and the page shows that instead of its charts.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import aiohttp

from mailgenius import contract, errors
from mailgenius import metrics as m
from mailgenius.prom import Prometheus, PrometheusError, finite

#: seconds to wait for Prometheus / Alertmanager before saying they are unreachable
BACKEND_TIMEOUT = 3.0


@dataclass(frozen=True)
class Range:
    seconds: int
    step: int
    #: rate() window: at least a few scrapes, and no finer than a step
    window: str
    #: seconds one answer is reused for every viewer (the page polls the 1 h range every 5 s)
    cache_seconds: float = 4.0


#: the ranges the page offers: the last hour (15 s points) and the guide's 24 h history (5 min)
RANGES = {
    "1h": Range(3600, 15, "1m"),
    "6h": Range(6 * 3600, 60, "2m", cache_seconds=25.0),
    "24h": Range(24 * 3600, 300, "5m", cache_seconds=55.0),
}


@dataclass(frozen=True)
class Series:
    #: legend; "{label}" is replaced by that label of each returned series
    legend: str
    expr: str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    unit: str
    series: tuple[Series, ...]


#: placeholders in the expressions below: the rate window of the selected range, and the whole
#: selected range (for ratios over the period the operator looks at)
W, R = "$WINDOW", "$RANGE"


def _rate(metric: str, selector: str = "", window: str = W, fn: str = "rate") -> str:
    return f"{fn}({metric}{selector}[{window}])"


def _q(quantile: float) -> str:
    return f"histogram_quantile({quantile}, sum by (le) ({_rate(_api(m.HTTP_REQUEST_DURATION + '_bucket'))}))"


_5XX = '{status=~"5.."}'


def _api(metric: str, selector: str = "") -> str:
    """``metric{<api requests>,selector}``: Prometheus' own scrapes of /metrics are not API
    traffic (the contract's ``api_requests`` selector, as the alerts and the summary)."""
    api = contract.get().selector("api_requests")
    return metric + "{" + ",".join(x for x in (api, selector.strip("{}")) if x) + "}"


#: every chart of the page
CHARTS: tuple[Chart, ...] = (
    Chart("api_latency", "API latency", "s", (
        Series("p50", _q(0.5)), Series("p95", _q(0.95)), Series("p99", _q(0.99)),
    )),
    Chart("api_traffic", "Requests and 5xx errors", "req/s", (
        Series("requests", f"sum({_rate(_api(m.HTTP_REQUESTS))})"),
        Series("5xx", f"sum({_rate(_api(m.HTTP_REQUESTS, _5XX))})"),
    )),
    Chart("import_rows", "Import rows", "rows/s", (
        Series("{outcome}", f"sum by (outcome) ({_rate(m.IMPORT_ROWS)})"),
    )),
    Chart("email_throughput", "Email throughput", "emails/s", (
        Series("sent", f"sum({_rate(m.EMAILS_SENT)})"),
        Series("failed", f"sum({_rate(m.EMAIL_SEND_FAILURES)})"),
        Series("{event}", f"sum by (event) ({_rate(m.EMAIL_EVENTS)})"),
    )),
    Chart("queue_depth", "Queue depth", "messages", (
        Series("{queue} waiting", f'sum by (queue) ({m.QUEUE_MESSAGES}{{state="waiting"}})'),
        Series("{queue} dead", f'sum by (queue) ({m.QUEUE_MESSAGES}{{state="dead"}})'),
    )),
    Chart("workers", "Workers", "processes", (
        Series("{queue}", f"sum by (queue) ({m.WORKERS})"),
    )),
)
CHART_IDS = {c.id for c in CHARTS}

_SENT = f"sum({_rate(m.EMAILS_SENT, window=R, fn='increase')})"
_INVALID = '{outcome="invalid"}'


def _recorded(key: str, agg: str = "", selector: str = "") -> str:
    """The contract's recorded series (what the alerts, the summary and the report show too)."""
    series = contract.get().series(key, selector)
    return f"{agg}({series})" if agg else series


#: instant figures of the page: name -> (unit, expr). Those other readers show too are the
#: recording rules' series of the contract (API p95 and error rate over 5 minutes, email rates
#: over the last hour, provider-aware: the delivery rate covers only providers with delivery
#: receipts, opens and clicks come from our own tracking for every provider).
STATS: dict[str, tuple[str, str]] = {
    "api_p50": ("s", _q(0.5)),
    "api_p95": ("s", _recorded("api_latency_p95_all")),
    "api_p99": ("s", _q(0.99)),
    "request_rate": ("req/s", f"sum({_rate(_api(m.HTTP_REQUESTS))})"),
    "error_rate": ("ratio", _recorded("http_error_ratio_all")),
    "emails_sent": ("emails", _SENT),
    "delivery_rate": ("ratio", _recorded("email_delivery_ratio_all")),
    "bounce_rate": ("ratio", _recorded("email_bounce_ratio_all")),
    "open_rate": ("ratio", _recorded("email_open_ratio_all")),
    "click_rate": ("ratio", _recorded("email_click_ratio_all")),
    "email_queue_waiting": ("messages", _recorded("queue_waiting", "max", f'queue="{m.QUEUE_EMAIL}"')),
    "import_queue_waiting": ("messages", _recorded("queue_waiting", "max", f'queue="{m.QUEUE_IMPORT}"')),
    "disk_usage": ("ratio", _recorded("disk_usage", "max")),
    "import_rows_per_second": ("rows/s", f"sum({_rate(m.IMPORT_ROWS)})"),
    "import_invalid_ratio": ("ratio", f"sum({_rate(m.IMPORT_ROWS, _INVALID, R, 'increase')})"
                                      f" / sum({_rate(m.IMPORT_ROWS, window=R, fn='increase')})"),
}
#: the window of the stats that are recorded series (the page labels them)
STAT_WINDOWS = {"api_p95": "5m", "error_rate": "5m", "delivery_rate": "1h", "bounce_rate": "1h",
                "open_rate": "1h", "click_rate": "1h"}


def expand(expr: str, rng: Range, range_name: str = "1h") -> str:
    return expr.replace(W, rng.window).replace(R, range_name)


def parse_range(raw: str | None) -> tuple[str, Range]:
    name = raw or "1h"
    if name not in RANGES:
        raise errors.ValidationError(f"range: must be one of {', '.join(RANGES)}; got {name[:20]!r}")
    return name, RANGES[name]


def _legend(template: str, labels: dict) -> str:
    out = template
    for k, v in labels.items():
        out = out.replace("{" + k + "}", v)
    return out if "{" not in out else template.split("{")[0] or "value"


class BackendDown(Exception):
    """Prometheus or Alertmanager did not answer usefully; the message says how."""


async def _get_json(http: aiohttp.ClientSession, url: str, params: dict | None = None):
    try:
        async with http.get(url, params=params, timeout=aiohttp.ClientTimeout(total=BACKEND_TIMEOUT)) as resp:
            if resp.status >= 500 or resp.status in (401, 403, 404):
                raise BackendDown(f"HTTP {resp.status} from {url.split('?')[0]}")
            return resp.status, await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise BackendDown(f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__) from None


async def range_series(http, prometheus_url: str, range_name: str, rng: Range, *, now: float | None = None) -> dict:
    """Every chart of :data:`CHARTS` over the range, as ``{"ok", "error", "charts"}``."""
    # end at now (not at a step boundary): the newest point is at most a scrape old
    end = math.floor(now or time.time())
    start = end - rng.seconds
    prom = Prometheus(prometheus_url, session=http, timeout=BACKEND_TIMEOUT)
    jobs = [(chart, s) for chart in CHARTS for s in chart.series]

    async def one(series: Series):
        return await prom.query_range(expand(series.expr, rng), start, end, rng.step)

    async def stat(expr: str):
        result = await prom.query(expand(expr, rng, range_name), at=end)
        return finite(result[0]["value"][1]) if result else None

    results = await asyncio.gather(*(one(s) for _c, s in jobs), *(stat(e) for _u, e in STATS.values()),
                                   return_exceptions=True)
    stat_results = results[len(jobs):]
    results = results[:len(jobs)]
    down = [r for r in results if isinstance(r, PrometheusError) and r.unreachable]
    if down and len(down) == len(results):
        return {"ok": False, "error": f"Prometheus unreachable: {down[0]}", "range": range_name,
                "charts": [], "stats": {}}
    charts: dict[str, dict] = {
        c.id: {"id": c.id, "title": c.title, "unit": c.unit, "series": [], "errors": []} for c in CHARTS
    }
    for (chart, series), result in zip(jobs, results, strict=True):
        out = charts[chart.id]
        if isinstance(result, BaseException):
            out["errors"].append(f"{series.legend}: {result}"[:200])
            continue
        for item in result:
            points = [[int(float(t)), finite(v)] for t, v in item.get("values", [])]
            out["series"].append({"name": _legend(series.legend, item.get("metric", {})), "points": points})
    stats = {}
    for (name, (unit, _e)), v in zip(STATS.items(), stat_results, strict=True):
        stats[name] = {"unit": unit, "value": None if isinstance(v, BaseException) else v}
        if name in STAT_WINDOWS:
            stats[name]["window"] = STAT_WINDOWS[name]
    if stats.get("delivery_rate", {}).get("value") is None:
        receipts = ", ".join(sorted(contract.get().receipt_providers))
        stats["delivery_rate"]["not_reported"] = (f"only {receipts} report deliveries; an SMTP relay "
                                                  "gives no receipts")
    return {"ok": True, "error": None, "range": range_name, "start": start, "end": end, "step": rng.step,
            "charts": list(charts.values()), "stats": stats}


#: severities, most urgent first (unknown ones sort last)
SEVERITY_ORDER = ("critical", "warning", "info")


async def active_alerts(http, alertmanager_url: str) -> dict:
    """Alerts firing now (not silenced or inhibited), most severe and oldest first."""
    url = alertmanager_url.rstrip("/") + "/api/v2/alerts"
    try:
        status, body = await _get_json(http, url, {"active": "true", "silenced": "false", "inhibited": "false"})
    except BackendDown as exc:
        return {"ok": False, "error": f"Alertmanager unreachable: {exc}", "alerts": []}
    if status != 200 or not isinstance(body, list):
        return {"ok": False, "error": f"Alertmanager answered HTTP {status}", "alerts": []}
    alerts = []
    for a in body:
        labels = a.get("labels", {}) or {}
        ann = a.get("annotations", {}) or {}
        alerts.append({
            "alertname": labels.get("alertname", ""),
            "severity": labels.get("severity", ""),
            "service": labels.get("service", labels.get("job", "")),
            "summary": ann.get("summary", ""),
            "description": ann.get("description", ""),
            "starts_at": a.get("startsAt", ""),
            "state": (a.get("status") or {}).get("state", ""),
            "fingerprint": a.get("fingerprint", ""),
        })
    rank = {s: i for i, s in enumerate(SEVERITY_ORDER)}
    alerts.sort(key=lambda x: (rank.get(x["severity"], len(rank)), x["starts_at"], x["alertname"]))
    return {"ok": True, "error": None, "alerts": alerts}
