"""Shared building blocks of the dashboards (grafanalib).

Every dashboard module (``<uid>.dashboard.py``) builds its panels with the functions here and
hands a list of :class:`Section` to :func:`dashboard`, which lays them out on Grafana's 24-column
grid, numbers the panels, and applies the house defaults (refresh 5 s, last 24 h, links to the
other dashboards, a datasource variable on each: ``${datasource}`` for Prometheus,
``${loki_datasource}`` on the dashboards with log panels).

:data:`CONFIG` is the mixin-style configuration: the default datasource each variable selects,
the regex limiting the datasources offered, and the selectors the queries use. Override it for
your Grafana with ``MAILGENIUS_DASHBOARDS_CONFIG=<file.yml>`` at build time (a YAML mapping of the
keys to change), or render elsewhere with :func:`configure`.

PromQL is written with the metric names of :mod:`mailgenius.metrics`, so a renamed metric breaks
the build instead of silently emptying a panel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import attr
import yaml
from grafanalib import core as g

from mailgenius import contract
from mailgenius import metrics as M

#: Grafana dashboard JSON schema version we emit: the one Grafana 11.6 and 12 write (41: no
#: ``timepicker.time_options``), so they load the dashboards without running schema migrations.
SCHEMA_VERSION = 41
#: Refresh every 5 s (operations guide: "Atualização a cada 5 segundos").
REFRESH = "5s"
#: Default range: the last 24 h (operations guide: "Dados históricos de 24 horas").
DEFAULT_TIME = g.Time("now-24h", "now")
#: Refresh choices offered in the picker; 5 s first.
REFRESH_INTERVALS = ["5s", "10s", "30s", "1m", "5m", "15m", "1h"]

#: The mixin-style configuration (module docstring). ``datasource``: the Prometheus datasource
#: the ``${datasource}`` variable selects by default (its name; provisioning/ defines it);
#: ``loki_datasource`` likewise; ``alertmanager_datasource``: the Alertmanager datasource the
#: alert-group panel reads (by name); ``datasource_regex``: limits the datasources offered (empty:
#: all of the type).
DEFAULT_CONFIG = {
    "datasource": "Prometheus",
    "loki_datasource": "Loki",
    "alertmanager_datasource": "Alertmanager",
    "datasource_regex": "",
}
CONFIG: dict = dict(DEFAULT_CONFIG)


def configure(overrides: dict | None = None) -> dict:
    """Set :data:`CONFIG` to the defaults plus ``overrides`` (unknown keys are an error), or,
    with None, plus the YAML file ``MAILGENIUS_DASHBOARDS_CONFIG`` names (if any)."""
    if overrides is None:
        path = os.environ.get("MAILGENIUS_DASHBOARDS_CONFIG")
        overrides = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown dashboards config keys: {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(DEFAULT_CONFIG)})")
    CONFIG.clear()
    CONFIG.update(DEFAULT_CONFIG, **overrides)
    return CONFIG


#: Datasource references: the dashboards' variables, never a fixed uid (they work in any Grafana)
PROMETHEUS = {"type": "prometheus", "uid": "${datasource}"}
LOKI = {"type": "loki", "uid": "${loki_datasource}"}
#: The uids provisioning/ gives the datasources of the compose stack.
PROVISIONED_UIDS = {"prometheus": "prometheus", "loki": "loki", "alertmanager": "alertmanager"}
#: Their names in the compose stack's Grafana.
DATASOURCE_NAMES = {"prometheus": "Prometheus", "loki": "Loki", "alertmanager": "Alertmanager"}

#: The dashboards: stable uid -> title (the guide's six, then ours). Alerts' ``dashboard_url`` annotations use /d/<uid>.
DASHBOARDS = {
    "system-health": "System Health Overview",
    "import-progress": "Import Progress",
    "email-metrics": "Email Metrics",
    "queue-health": "Queue Health",
    "alerts-incidents": "Alerts & Incidents",
    "structured-logs": "Structured Logs",
    # beyond the guide (issue 22): the SLOs of alerting/slos.yml
    "slo": "SLOs and error budgets",
}
#: Tag carried by every dashboard; the dashboard links list the others through it.
TAG = "mailgenius"

#: Job names of the HTTP services (the scrape config's job = service label).
HTTP_SERVICES = ("sender", "importer", "exporter")
#: Job names of the dramatiq worker groups.
WORKER_JOBS = ("sender-worker", "importer-worker")
#: The contract (alerting/rules.yml, through mailgenius.contract): thresholds, selectors and the
#: recorded series the alerts use, so a panel's colours and figures follow the alerts.
CONTRACT = contract.get()
#: Filesystems worth watching (not tmpfs, overlays or pseudo filesystems): the DiskSpaceLow selector.
FS_SELECTOR = CONTRACT.selector("filesystems")
#: API traffic (Prometheus' scrapes of /metrics excluded), as the alerts and the summary count it.
API_SELECTOR = CONTRACT.selector("api_requests")
#: Providers with delivery receipts (delivered / complained are unknown for the others).
RECEIPTS_SELECTOR = CONTRACT.selector("delivery_reporting")


def threshold(name: str) -> float:
    """A threshold of the contract (the alerts' own number)."""
    return CONTRACT.threshold(name)


def recorded(key: str, selector: str = "") -> str:
    """The recorded series of the contract (what the alerts and every other reader show)."""
    return CONTRACT.series(key, selector)


def fires(alert: str, word: str, name: str, fmt: str = "pct", what: str = "") -> str:
    """Panel description naming the alert and its threshold, e.g. "QueueDepthHigh fires above
    1000 waiting messages." (fmt: pct, ms or num, as the alert texts)."""
    value = {"pct": contract.percent, "ms": contract.milliseconds, "num": contract.number}[fmt](threshold(name))
    return f"{alert} fires {word} {value}{(' ' + what) if what else ''}."


# -- queries ---------------------------------------------------------------------------------

def rate(metric: str, selector: str = "", by: str = "", window: str = "$__rate_interval",
         fn: str = "rate") -> str:
    """``sum by (<by>) (rate(metric{selector}[window]))``."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({fn}({metric}{{{selector}}}[{window}]))"


def increase(metric: str, selector: str = "", by: str = "", window: str = "$__range") -> str:
    """Events over the dashboard's range (24 h by default)."""
    return rate(metric, selector, by, window, fn="increase")


def ratio(numerator: str, denominator: str) -> str:
    """``numerator / denominator`` that is 0, not empty, when the numerator has no series yet.

    (A counter such as 5xx responses only appears after its first event; ``or`` fills the gap
    with zeros on the denominator's label set.)
    """
    return f"({numerator} or ({denominator}) * 0) / ({denominator})"


def zero_fill(expr: str, like: str) -> str:
    """``expr``, or zeros on the label sets of ``like`` while ``expr`` has no series: for
    counters a library creates on their first increment (dramatiq's errors, retries, rejects)."""
    return f"({expr}) or ({like}) * 0"


def per_queue(expr: str, by: str = "") -> str:
    """dramatiq's own series (labelled ``queue_name``) summed by our ``queue`` label, mapped the
    one way :func:`mailgenius.metrics.as_queue_label` maps it (``by``: more labels to keep)."""
    return f"sum by ({', '.join(['queue', *([by] if by else [])])}) ({M.as_queue_label(expr)})"


def quantile(q: float, histogram: str, selector: str = "", by: str = "",
             window: str = "$__rate_interval") -> str:
    grouping = ", ".join(["le", *([b.strip() for b in by.split(",")] if by else [])])
    return (f"histogram_quantile({q}, sum by ({grouping}) "
            f"(rate({histogram}_bucket{{{selector}}}[{window}])))")


def mean_of(histogram: str, selector: str = "", by: str = "", window: str = "$__rate_interval") -> str:
    return f"{rate(histogram + '_sum', selector, by, window)} / {rate(histogram + '_count', selector, by, window)}"


# -- targets ---------------------------------------------------------------------------------

@attr.s
class LokiTarget:
    """A LogQL query on the ``loki`` datasource (grafanalib has no Loki target)."""

    expr = attr.ib()
    legendFormat = attr.ib(default="")
    refId = attr.ib(default="")
    queryType = attr.ib(default="range")
    maxLines = attr.ib(default=None)

    def to_json_data(self):
        data = {"datasource": LOKI, "editorMode": "code", "expr": self.expr,
                "legendFormat": self.legendFormat, "queryType": self.queryType, "refId": self.refId}
        if self.maxLines:
            data["maxLines"] = self.maxLines
        return data


def prom(expr: str, legend: str = "", instant: bool = False, fmt: str = "time_series") -> g.Target:
    """A PromQL target on the ``prometheus`` datasource (refIds are set by the panel helpers)."""
    return g.Target(expr=expr, legendFormat=legend, instant=instant, format=fmt,
                    datasource=PROMETHEUS, intervalFactor=1)


def logql(expr: str, legend: str = "", max_lines: int | None = None) -> LokiTarget:
    return LokiTarget(expr=expr, legendFormat=legend, maxLines=max_lines)


def _ref(targets: Sequence) -> list:
    out = []
    for i, t in enumerate(targets):
        out.append(attr.evolve(t, refId=chr(ord("A") + i)))
    return out


def _datasource_of(targets: Sequence) -> dict:
    loki = {isinstance(t, LokiTarget) for t in targets}
    if len(loki) > 1:
        raise ValueError("a panel mixes Prometheus and Loki targets")
    return LOKI if True in loki else PROMETHEUS


def _thresholds(steps: Sequence[tuple[float | None, str]] | None) -> list[dict]:
    steps = steps or [(None, "green")]
    return [{"color": color, "value": _clean(value)} for value, color in steps]


def _clean(value: float | None) -> float | int | None:
    """A threshold as JSON shows it best: 500.0 -> 500, 0.020000000000000004 -> 0.02."""
    if value is None:
        return None
    value = round(float(value), 9)
    return int(value) if value.is_integer() else value


#: Traffic-light thresholds for ratios where high is bad (values are fractions, 0..1).
def high_bad(warn: float, crit: float) -> list[tuple[float | None, str]]:
    return [(None, "green"), (warn, "orange"), (crit, "red")]


def low_bad(warn: float, crit: float) -> list[tuple[float | None, str]]:
    return [(None, "red"), (crit, "orange"), (warn, "green")]


# -- panels ----------------------------------------------------------------------------------

def timeseries(title: str, targets: Sequence, unit: str = "short", description: str = "",
               stacked: bool = False, bars: bool = False, thresholds=None, legend_calcs=None,
               min_zero: bool = True, links: list | None = None) -> g.TimeSeries:
    return g.TimeSeries(
        title=title, description=description, targets=_ref(targets), dataSource=_datasource_of(targets),
        unit=unit, fillOpacity=40 if bars else 10, drawStyle="bars" if bars else "line",
        stacking={"mode": "normal", "group": "A"} if stacked else {"mode": "none"},
        legendDisplayMode="table" if legend_calcs else "list", legendCalcs=legend_calcs or [],
        tooltipMode="multi", valueMin=0 if min_zero else None,
        thresholds=_thresholds(thresholds), thresholdsStyleMode="dashed" if thresholds else "off",
        maxDataPoints=None, links=links or [],
    )


def stat(title: str, targets: Sequence, unit: str = "short", description: str = "",
         thresholds=None, mappings: list | None = None, decimals: int | None = None,
         graph: bool = False, calc: str = "lastNotNull", text_mode: str = "auto",
         links: list | None = None) -> g.Stat:
    return g.Stat(
        title=title, description=description, targets=_ref(targets), dataSource=_datasource_of(targets),
        format=unit, thresholds=_thresholds(thresholds), mappings=mappings or [],
        decimals=decimals, graphMode="area" if graph else "none", reduceCalc=calc,
        colorMode="background" if thresholds else "value", textMode=text_mode,
        noValue="no data", maxDataPoints=None, links=links or [],
    )


def gauge(title: str, targets: Sequence, unit: str = "percentunit", description: str = "",
          thresholds=None, max_value: float = 1) -> g.GaugePanel:
    return g.GaugePanel(
        title=title, description=description, targets=_ref(targets), dataSource=_datasource_of(targets),
        format=unit, min=0, max=max_value, calc="lastNotNull",
        thresholds=_thresholds(thresholds), thresholdMarkers=True, maxDataPoints=None,
    )


def bargauge(title: str, targets: Sequence, unit: str = "short", description: str = "",
             thresholds=None, max_value: float | None = None) -> g.BarGauge:
    return g.BarGauge(
        title=title, description=description, targets=_ref(targets), dataSource=_datasource_of(targets),
        format=unit, min=0, max=max_value, calc="lastNotNull", displayMode="gradient",
        orientation="horizontal", thresholds=_thresholds(thresholds), maxDataPoints=None,
    )


def table(title: str, targets: Sequence, description: str = "", unit: str = "",
          hide: Iterable[str] = ("Time",), mappings: list | None = None,
          links: list | None = None) -> g.Table:
    exclude = {name: True for name in hide}
    return g.Table(
        title=title, description=description, targets=_ref(targets), dataSource=_datasource_of(targets),
        unit=unit, mappings=mappings or [], filterable=True,
        transformations=[{"id": "merge", "options": {}},
                         {"id": "organize", "options": {"excludeByName": exclude}}],
        maxDataPoints=None, links=links or [],
    )


def state_timeline(title: str, targets: Sequence, description: str = "",
                   mappings: list | None = None, thresholds=None) -> g.StateTimeline:
    return g.StateTimeline(
        title=title, description=description, targets=_ref(targets), dataSource=_datasource_of(targets),
        mappings=mappings or [], thresholds=_thresholds(thresholds), maxDataPoints=None,
    )


def logs(title: str, targets: Sequence, description: str = "") -> g.Logs:
    return g.Logs(
        title=title, description=description, targets=_ref(targets), dataSource=LOKI,
        showTime=True, showLabels=True, wrapLogMessages=True, enableLogDetails=True,
        prettifyLogMessage=False, sortOrder="Descending", maxDataPoints=None,
    )


def text(title: str, content: str) -> g.Text:
    return g.Text(title=title, content=content, mode="markdown", maxDataPoints=None)


@attr.s
class AlertListPanel(g.Panel):
    """Grafana's unified alert list: the Prometheus datasource's alert rules (any state).

    It reads Prometheus' ``/api/v1/rules`` through Grafana, so it carries no query target."""

    source = attr.ib(factory=lambda: CONFIG["datasource"])

    def to_json_data(self):
        return self.panel_json({
            "type": "alertlist",
            "datasource": None,
            "targets": [],
            "options": {
                "viewMode": "list", "groupMode": "default", "groupBy": [], "maxItems": 100,
                "sortOrder": 1, "dashboardAlerts": False, "alertName": "", "alertInstanceLabelFilter": "",
                "datasource": self.source, "folder": None, "showInstances": True,
                "stateFilter": {"firing": True, "pending": True, "noData": True, "normal": True,
                                "error": True},
            },
        })


@attr.s
class AlertGroupsPanel(g.Panel):
    """Grafana's Alertmanager alert groups, read from the provisioned Alertmanager datasource
    (by name): what Alertmanager holds, grouped as it routes them. No query target."""

    source = attr.ib(factory=lambda: CONFIG["alertmanager_datasource"])
    labels = attr.ib(default="")

    def to_json_data(self):
        return self.panel_json({
            "type": "alertGroups", "datasource": None, "targets": [],
            "options": {"alertmanager": self.source, "expandAll": False, "labels": self.labels},
        })


def status_mapping(values: dict) -> list[dict]:
    """Value -> (text, color) mappings, e.g. ``{1: ("UP", "green"), 0: ("DOWN", "red")}``."""
    options = {str(k): {"text": text_, "color": color, "index": i}
               for i, (k, (text_, color)) in enumerate(values.items())}
    return [{"type": "value", "options": options}]


def range_mapping(ranges: Sequence[tuple[float, float, str, str]]) -> list[dict]:
    """``[(from, to, text, color), ...]`` range mappings."""
    return [{"type": "range", "options": {"from": lo, "to": hi, "result": {"text": t, "color": c, "index": i}}}
            for i, (lo, hi, t, c) in enumerate(ranges)]


UP_DOWN = status_mapping({1: ("UP", "green"), 0: ("DOWN", "red")})


# -- variables -------------------------------------------------------------------------------

def query_var(name: str, label: str, query: str, datasource: dict = PROMETHEUS,
              all_value: str = ".*", regex: str = "") -> g.Template:
    """A multi-value variable with "All" (``allValue`` is a regex: use it with ``=~``)."""
    tpl = g.Template(
        name=name, label=label, query=query, dataSource=datasource, includeAll=True, multi=True,
        allValue=all_value, refresh=g.REFRESH_ON_TIME_RANGE_CHANGE, regex=regex or "",
        sort=g.SORT_ALPHA_ASC,
    )
    tpl._current = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return tpl


def service_var() -> g.Template:
    return query_var("service", "Service", "label_values(up, service)")


def queue_var() -> g.Template:
    return query_var("queue", "Queue", f"label_values({M.QUEUE_MESSAGES}, queue)")


def provider_var() -> g.Template:
    return query_var("provider", "Provider", f"label_values({M.EMAILS_SENT}, provider)")


def campaign_var() -> g.Template:
    return query_var("campaign", "Campaign", f"label_values({M.CAMPAIGN_MESSAGES}, campaign)")


# -- layout ----------------------------------------------------------------------------------

@dataclass
class Section:
    """A titled row of panels; each item is ``(panel, width, height)`` on the 24-column grid.

    ``guide`` names the operations-guide bullet(s) this row implements (tests check that every
    bullet of the guide's dashboard section is covered)."""

    title: str
    panels: list[tuple[g.Panel, int, int]] = field(default_factory=list)
    guide: tuple[str, ...] = ()
    collapsed: bool = False


GRID_WIDTH = 24


def layout(sections: Sequence[Section]) -> list:
    """Place rows and panels left to right, wrapping at 24 columns; returns Grafana panels."""
    out: list = []
    y = 0
    for section in sections:
        row = g.RowPanel(title=section.title, gridPos=g.GridPos(h=1, w=GRID_WIDTH, x=0, y=y),
                         collapsed=False, maxDataPoints=None)
        if section.guide:
            row = attr.evolve(row, description="Operations guide: " + "; ".join(section.guide))
        out.append(row)
        y += 1
        x, line_h = 0, 0
        for panel, w, h in section.panels:
            if not 0 < w <= GRID_WIDTH:
                raise ValueError(f"{panel.title}: width {w} is not within 1..{GRID_WIDTH}")
            if x + w > GRID_WIDTH:
                y, x, line_h = y + line_h, 0, 0
            out.append(attr.evolve(panel, gridPos=g.GridPos(h=h, w=w, x=x, y=y)))
            x += w
            line_h = max(line_h, h)
        y += line_h
    return out


def dashboard_links(current: str) -> list:
    """Links to the other dashboards (kept time range and variables)."""
    return [g.DashboardLink(title=title, type="link", uri=f"/d/{uid}", keepTime=True,
                            includeVars=True, icon="dashboard", tooltip=f"Open {title}")
            for uid, title in DASHBOARDS.items() if uid != current]


def panel_link(uid: str, title: str | None = None) -> dict:
    """A panel-level data link to another dashboard (drill-down)."""
    return {"title": f"Open {title or DASHBOARDS[uid]}", "url": f"/d/{uid}?${{__url_time_range}}&${{__all_variables}}",
            "targetBlank": False}


def datasource_var(name: str, label: str, kind: str, default: str) -> dict:
    """A datasource variable: every panel of that type follows the one picked (``${name}``)."""
    return {"type": "datasource", "name": name, "label": label, "query": kind,
            "current": {"selected": False, "text": default, "value": default},
            "regex": CONFIG["datasource_regex"], "hide": 0, "includeAll": False, "multi": False,
            "options": [], "refresh": 1, "skipUrlSync": False}


def _uses_loki(sections: Sequence[Section]) -> bool:
    return any(isinstance(p, g.Logs) or any(isinstance(t, LokiTarget) for t in getattr(p, "targets", []) or [])
               for s in sections for p, _w, _h in s.panels)


def build_dashboard(uid: str, description: str, sections: Sequence[Section],
              variables: Sequence[g.Template] = (), annotations: Sequence[dict] = ()) -> g.Dashboard:
    if uid not in DASHBOARDS:
        raise ValueError(f"unknown dashboard uid {uid!r}")
    sources = [datasource_var("datasource", "Prometheus", "prometheus", CONFIG["datasource"])]
    if _uses_loki(sections):
        sources.append(datasource_var("loki_datasource", "Loki", "loki", CONFIG["loki_datasource"]))
    variables = [*sources, *variables]
    anns = [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
        "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
    }, *annotations]
    return g.Dashboard(
        uid=uid, title=DASHBOARDS[uid], description=description, tags=[TAG], editable=True,
        refresh=REFRESH, time=DEFAULT_TIME, schemaVersion=SCHEMA_VERSION, timezone="utc",
        timePicker=g.TimePicker(refreshIntervals=REFRESH_INTERVALS, timeOptions=[
            "5m", "15m", "1h", "6h", "12h", "24h", "2d", "7d", "30d"]),
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        templating=g.Templating(list=list(variables)), links=dashboard_links(uid),
        annotations=g.Annotations(list=anns), panels=layout(sections),
    ).auto_panel_ids()


def alerts_annotation() -> dict:
    """Firing alerts drawn on every time series (ALERTS is Prometheus' own series)."""
    return {
        "datasource": PROMETHEUS, "enable": True, "iconColor": "red", "name": "Firing alerts",
        "expr": 'ALERTS{alertstate="firing", alertname!="Watchdog"}', "step": "30s",
        "titleFormat": "{{alertname}}", "textFormat": "{{severity}} {{service}}",
        "tagKeys": "alertname,severity", "useValueForTime": False,
    }
