"""6. Structured Logs (Loki): live logs filtered by service, level and free text, volume by
level, error rate, and export.

Only ``service`` and ``level`` are Loki labels (logging/config.alloy promotes them from the
services' JSON lines); everything else (request_id, import_id, campaign_id, ...) stays in the
line and is reached with ``| json`` at query time.
"""

from grafanalib import core as g

from dashboards.helpers import (
    LOKI,
    Section,
    build_dashboard,
    high_bad,
    logql,
    logs,
    panel_link,
    stat,
    text,
    timeseries,
)

#: The stream selector every panel shares: the dashboard's service and level filters.
STREAM = '{service=~"$service", level=~"$level"}'
#: Free-text filter (case-insensitive regular expression; empty matches everything).
SEARCH = '|~ "(?i)$search"'
ERRORS = '{service=~"$service", level=~"error|critical"}'
ALL = '{service=~"$service"}'

live = logs("Real-time Logs", [logql(f"{STREAM} {SEARCH}", max_lines=1000)],
            description="Newest first. Filters: service, level and the search box above.")

volume_by_level = timeseries(
    "Log volume by level", [logql(f"sum by (level) (count_over_time({STREAM} {SEARCH} [$__interval]))", "{{level}}")],
    bars=True, stacked=True,
)
volume_by_service = timeseries(
    "Log volume by service", [logql(f"sum by (service) (count_over_time({STREAM} {SEARCH} [$__interval]))",
                                    "{{service}}")],
    bars=True, stacked=True,
)

search_hits = timeseries(
    "Search matches per minute",
    [logql(f"sum by (service) (count_over_time({STREAM} {SEARCH} [1m]))", "{{service}}")],
    description="Lines matching the search box, per service.",
)
search_results = logs(
    "Search results with context fields",
    [logql(f'{STREAM} {SEARCH} | json | line_format "{{{{.service}}}} {{{{.level}}}} {{{{.message}}}} '
           f'request_id={{{{.request_id}}}} import_id={{{{.import_id}}}} campaign_id={{{{.campaign_id}}}}"',
           max_lines=500)],
    description="The JSON fields of each line (request_id, import_id, campaign_id, ...) are parsed "
                "at query time; add `| json | import_id=\"42\"` in Explore to follow one import.",
)

error_rate = timeseries(
    "Error lines per second by service",
    [logql(f"sum by (service) (rate({ERRORS} [$__interval]))", "{{service}}")], unit="ops",
)
error_ratio = stat(
    "Error ratio (5 m)",
    [logql(f"sum(count_over_time({ERRORS} [5m])) / sum(count_over_time({ALL} [5m]))")],
    unit="percentunit", thresholds=high_bad(0.01, 0.05), links=[panel_link("system-health")],
)
errors = logs("Errors", [logql(f"{ERRORS} {SEARCH}", max_lines=500)])

export = text(
    "Export Features",
    "**Export logs.** Every logs panel's menu → *Inspect* → *Data* → *Download CSV* (or *Download logs* "
    "in Explore) saves what the filters above select.\n\n"
    "**Explore.** [Open these filters in Explore](/explore?left=%7B%22datasource%22:%22loki%22%7D) for "
    "ad-hoc LogQL, e.g. `{service=\"importer\"} | json | import_id=\"42\"`.\n\n"
    "**Labels.** Only `service` and `level` are labels; other fields are JSON keys in the line.",
)

level_var = g.Template(
    name="level", label="Level", type="custom", query="debug,info,warning,error,critical",
    # "All" also keeps lines without a level (plain-text lines of third-party processes);
    # the service matcher (".+") keeps the selector valid for Loki
    includeAll=True, multi=True, allValue=".*",
)
level_var._current = {"selected": True, "text": ["All"], "value": ["$__all"]}
service_var = g.Template(
    name="service", label="Service", query="label_values(service)", dataSource=LOKI, includeAll=True,
    multi=True, allValue=".+", refresh=g.REFRESH_ON_TIME_RANGE_CHANGE,
)
service_var._current = {"selected": True, "text": ["All"], "value": ["$__all"]}
search_var = g.Template(name="search", label="Search", type="textbox", query="", default="")

dashboard = build_dashboard(
    "structured-logs",
    "Structured JSON logs of every service and worker, from Loki.",
    [
        Section("Log Filtering — volume by level and service", [(volume_by_level, 12, 7), (volume_by_service, 12, 7)],
                guide=("Log Filtering",)),
        Section("Real-time Logs", [(live, 24, 14)], guide=("Real-time Logs",)),
        Section("Search Capability", [(search_hits, 8, 10), (search_results, 16, 10)], guide=("Search Capability",)),
        Section("Error rate", [(error_ratio, 4, 8), (error_rate, 8, 8), (errors, 12, 8)]),
        Section("Export Features", [(export, 24, 4)], guide=("Export Features",)),
    ],
    variables=[service_var, level_var, search_var],
)
