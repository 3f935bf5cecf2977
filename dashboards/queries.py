"""Every query of the generated dashboards, with Grafana's variables substituted, and a check of
each against a live Prometheus (``mailgenius dashboards check``; the live tests use it too).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailgenius.prom import Prometheus, PrometheusError

#: Grafana's built-in interval variables, as a live check substitutes them (1 s scrapes in tests,
#: so a 1 m window holds enough samples for rate(); the range is what a fresh stack has seen).
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__auto": "1m",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

#: PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "Inf", "NaN", "e", "atan2",
}

#: a Grafana variable reference. Names start with a letter or "_": ``$1`` in a label_replace()
#: replacement is a regex group, which Grafana leaves as it is (it names no variable)
_VAR = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]")


@dataclass(frozen=True)
class Query:
    dashboard: str  # uid
    panel_id: int | None  # None for annotations and variables
    panel: str  # panel title, "annotation: <name>" or "variable: <name>"
    ref_id: str
    datasource: str  # datasource uid: prometheus or loki
    expr: str
    instant: bool = False

    @property
    def key(self) -> str:
        """Stable name of the query in reports and exception lists: ``uid/panel title/refId``."""
        return f"{self.dashboard}/{self.panel}/{self.ref_id}"


def load_json(root: Path) -> dict[str, dict]:
    """uid -> dashboard JSON, from dashboards/json/."""
    out = {}
    for path in sorted((Path(root) / "dashboards" / "json").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out[data["uid"]] = data
    return out


def iter_panels(dash: dict) -> Iterator[dict]:
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def _ds_uid(ds) -> str | None:
    """The datasource of a reference: ``prometheus`` or ``loki`` (a ``${variable}`` reference
    stands for a datasource of its type)."""
    if isinstance(ds, dict):
        uid = ds.get("uid")
        return ds.get("type") if isinstance(uid, str) and uid.startswith("$") else uid
    return ds


def iter_queries(dash: dict) -> Iterator[Query]:
    uid = dash["uid"]
    for panel in iter_panels(dash):
        for target in panel.get("targets") or []:
            ds = _ds_uid(target.get("datasource")) or _ds_uid(panel.get("datasource"))
            yield Query(uid, panel.get("id"), panel.get("title", ""), target.get("refId", ""), ds,
                        target.get("expr", ""), bool(target.get("instant")))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            yield Query(uid, None, f"annotation: {ann['name']}", "annotation", _ds_uid(ann.get("datasource")),
                        ann["expr"])


def used_variables(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VAR.finditer(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$var``, ``${var}`` and ``[[var]]`` like Grafana does; unknown names raise KeyError."""
    def repl(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        if name in values:
            return values[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise KeyError(name)

    return _VAR.sub(repl, expr)


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"'(?:[^'\\]|\\.)*'", "''", expr)
    expr = re.sub(r"\{[^{}]*\}", "", expr)
    expr = re.sub(r"\[[^\[\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are not functions or keywords)."""
    body = _strip(expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", body):
        name, call = m.group(1), m.group(2)
        if call or name in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def logql_labels(expr: str) -> set[str]:
    """Stream labels a LogQL expression uses: in its ``{...}`` selectors and ``by``/``without``."""
    labels = set()
    for sel in re.findall(r"\{([^{}]*)\}", re.sub(r'\| *line_format +"(?:[^"\\]|\\.)*"', "", expr)):
        for m in re.finditer(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)", sel):
            labels.add(m.group(1))
    for grp in re.findall(r"\b(?:by|without)\s*\(([^()]*)\)", expr):
        labels.update(x.strip() for x in grp.split(",") if x.strip())
    return labels


# -- live check (through the kernel's Prometheus client) ---------------------------------------

async def _query(prom: Prometheus, expr: str) -> tuple[bool, list | str]:
    """Instant query: (True, result list) or (False, Prometheus' error message); raises
    PrometheusError when Prometheus is unreachable."""
    try:
        return True, await prom.query(expr)
    except PrometheusError as exc:
        if exc.unreachable:
            raise
        return False, str(exc)


async def _label_values(prom: Prometheus, metric: str, label: str) -> list[str]:
    data = await prom.get(f"/api/v1/label/{urllib.parse.quote(label)}/values", {"match[]": metric})
    return sorted(data)


def prometheus_query(base_url: str, expr: str) -> tuple[bool, list | str]:
    """Instant query: (True, result list) or (False, Prometheus' error message)."""
    async def run():
        async with Prometheus(base_url, timeout=10.0) as prom:
            return await _query(prom, expr)

    return asyncio.run(run())


def label_values(base_url: str, metric: str, label: str) -> list[str]:
    """Values of ``label`` on the series of ``metric`` (Grafana's ``label_values(metric, label)``)."""
    async def run():
        async with Prometheus(base_url, timeout=10.0) as prom:
            return await _label_values(prom, metric, label)

    return asyncio.run(run())


_LABEL_VALUES = re.compile(r"^label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)$")


async def _variable_values(prom: Prometheus, dash: dict) -> dict[str, str]:
    values: dict[str, str] = {}
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if _ds_uid(var.get("datasource")) != "prometheus" or var.get("type") != "query":
            continue
        m = _LABEL_VALUES.match(query or "")
        if not m:
            raise ValueError(f"{dash['uid']}: variable {var['name']}: unsupported query {query!r}")
        found = await _label_values(prom, m.group(1), m.group(2))
        if not found:
            raise LookupError(f"{dash['uid']}: variable ${var['name']} has no values ({query})")
        escaped = [re.sub(r"([\\.^$*+?()\[\]{}|])", r"\\\\\1", v) for v in found]
        values[var["name"]] = "(" + "|".join(escaped) + ")" if len(escaped) > 1 else escaped[0]
    return values


def variable_values(base_url: str, dash: dict) -> dict[str, str]:
    """Grafana-style values of a dashboard's Prometheus variables, from the live Prometheus:
    every current value of the variable, formatted as Grafana formats a multi-value selection
    for a regex matcher (``(a|b)``). A variable with no values yet raises LookupError."""
    async def run():
        async with Prometheus(base_url, timeout=10.0) as prom:
            return await _variable_values(prom, dash)

    return asyncio.run(run())


@dataclass
class Result:
    query: Query
    expr: str  # as sent
    ok: bool
    series: int
    error: str = ""


async def _check(base_url: str, dashboards: dict[str, dict], uids: Iterable[str] | None) -> list[Result]:
    results = []
    async with Prometheus(base_url, timeout=10.0) as prom:
        for uid in (uids or sorted(dashboards)):
            dash = dashboards[uid]
            queries = [q for q in iter_queries(dash) if q.datasource == "prometheus"]
            if not queries:
                continue
            try:
                values = await _variable_values(prom, dash)
            except LookupError as exc:
                values = None
                missing = str(exc)
            for q in queries:
                if values is None:
                    results.append(Result(q, q.expr, False, 0, missing))
                    continue
                expr = substitute(q.expr, values)
                ok, res = await _query(prom, expr)
                if ok:
                    results.append(Result(q, expr, True, len(res)))
                else:
                    results.append(Result(q, expr, False, 0, str(res)))
    return results


def check_prometheus(base_url: str, dashboards: dict[str, dict],
                     uids: Iterable[str] | None = None) -> list[Result]:
    """Run every Prometheus query of the dashboards as an instant query, variables substituted.
    Raises mailgenius.prom.PrometheusError when Prometheus is unreachable."""
    return asyncio.run(_check(base_url, dashboards, uids))
