"""Error budgets of the SLOs (docs/slos.md) for the page's "Error budgets" card: one instant
query for the series ``prometheus/rules/slo.yml`` records, grouped by their ``slo`` label, plus
the SLO alerts firing now.

The series' names come from the kernel (:mod:`mailgenius.slo_series`), which alerting/slo.py
records them under: services do not import the tools layer. Prometheus being down is an answer, as for the charts:
``{"ok": false, "error": "Prometheus unreachable: ..."}``.
"""

from __future__ import annotations

from mailgenius import slo_series as S
from mailgenius.prom import Prometheus, PrometheusError, finite

from .sources import BACKEND_TIMEOUT

#: field of the page's JSON -> recorded series (every one labelled slo="<name>")
SERIES = {
    "objective": S.OBJECTIVE,
    "error_budget": S.ERROR_BUDGET,
    "budget_remaining": S.BUDGET_REMAINING,
    "burn_rate_1h": S.CURRENT_BURN_RATE,
    "error_ratio_30d": S.ratio_name("30d"),
    "exhaustion_seconds": S.BUDGET_EXHAUSTION,
}
#: what a firing SLO alert means for the budget, by severity (alerting/slos.yml `alerts`)
ALERT_KINDS = {"critical": "page", "warning": "ticket"}

#: one query: every recorded budget series and the SLO alerts firing now
QUERY = ('{__name__=~"' + "|".join(sorted(SERIES.values())) + '",slo!=""}'
         ' or ALERTS{alertstate="firing",slo!=""}')


async def slo_budgets(http, prometheus_url: str) -> dict:
    """``{"ok", "error", "slos": [{"slo", <SERIES fields>, "alert"}]}``, SLOs by name; a field is
    None when its series is absent (no traffic yet; ``exhaustion_seconds``: nothing burning)."""
    prom = Prometheus(prometheus_url, session=http, timeout=BACKEND_TIMEOUT)
    try:
        result = await prom.query(QUERY)
    except PrometheusError as exc:
        if exc.unreachable:
            return {"ok": False, "error": f"Prometheus unreachable: {exc}", "slos": []}
        return {"ok": False, "error": f"Prometheus refused the query: {exc}", "slos": []}
    by_name = {v: k for k, v in SERIES.items()}
    slos: dict[str, dict] = {}
    for item in result:
        metric = item.get("metric", {})
        name = metric.get("slo")
        if not name:
            continue
        row = slos.setdefault(name, {"slo": name, **{k: None for k in SERIES}, "alert": None})
        if metric.get("__name__") == "ALERTS":
            kind = ALERT_KINDS.get(metric.get("severity", ""))
            # a page outranks a ticket (Alertmanager mutes the ticket under it)
            if kind and row["alert"] != "page":
                row["alert"] = kind
            continue
        field = by_name.get(metric.get("__name__", ""))
        if field:
            row[field] = finite(item.get("value", [None, None])[1])
    return {"ok": True, "error": None, "slos": [slos[k] for k in sorted(slos)]}
