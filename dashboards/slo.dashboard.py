"""7. SLOs and error budgets (beyond the guide, issue 22): per SLO of alerting/slos.yml, the
budget left over 30 days, the burn rate over every alert window, time to exhaustion, the error
ratio. Everything reads the series prometheus/rules/slo.yml records (docs/slos.md)."""

from dashboards.helpers import (
    Section,
    alerts_annotation,
    build_dashboard,
    prom,
    query_var,
    stat,
    status_mapping,
    table,
    timeseries,
)
from mailgenius import slo_series as S

SEL = 'slo=~"$slo"'


def _series(name: str) -> str:
    return f"{name}{{{SEL}}}"


def burn(window: str) -> str:
    """Burn rate over a window: its error ratio / the SLO's budget (1 = the budget lasts the period)."""
    return f"{_series(S.ratio_name(window))} / on (slo) {_series(S.ERROR_BUDGET)}"


def _factor_lines(*factors: float) -> list[tuple[float | None, str]]:
    """The page/ticket burn factors of alerting/slos.yml as threshold lines."""
    colors = {1.0: "yellow", 3.0: "orange", 6.0: "red", 14.4: "dark-red"}
    return [(None, "green"), *((f, colors.get(f, "red")) for f in factors)]


remaining = stat(
    "Error budget remaining (30 days)", [prom(_series(S.BUDGET_REMAINING), "{{slo}}")],
    unit="percentunit", decimals=1, text_mode="value_and_name",
    thresholds=[(None, "red"), (0, "orange"), (0.25, "green")],
    description="Share of the 30-day error budget not yet spent: 1 - (error ratio over 30 days / "
                "budget). Below 0 the SLO is missed for the period.",
)
#: -1 stands for "not burning": the recorded time to exhaustion is absent when nothing fails
NOT_BURNING = -1
exhaustion = stat(
    "Time to exhaustion (at the last hour's rate)",
    [prom(f"{_series(S.BUDGET_EXHAUSTION)} or on (slo) ({_series(S.OBJECTIVE)} * 0 + {NOT_BURNING})", "{{slo}}")],
    unit="s", decimals=1, text_mode="value_and_name",
    mappings=status_mapping({NOT_BURNING: ("not burning", "green")}),
    thresholds=[(None, "red"), (0, "red"), (3 * 86400, "orange"), (30 * 86400, "green")],
    description="How long the budget left lasts if the last hour's burn rate goes on. Under 3 days: "
                "the ticket alert's territory; 0: spent.",
)
current = stat(
    "Burn rate now (1 h)", [prom(_series(S.CURRENT_BURN_RATE), "{{slo}}")], decimals=2,
    text_mode="value_and_name", thresholds=_factor_lines(1, 3, 6, 14.4),
    description="Error ratio of the last hour / budget. 1 spends the budget in exactly 30 days; the "
                "page needs 14.4 (1 h and 5 min) or 6 (6 h and 30 min), the ticket 3 (1 d and 2 h) "
                "or 1 (3 d and 6 h).",
)
objectives = table(
    "Objectives",
    [prom(_series(S.OBJECTIVE), "{{slo}}", instant=True, fmt="table"),
     prom(_series(S.ERROR_BUDGET), "{{slo}}", instant=True, fmt="table")],
    unit="percentunit", hide=("Time", "__name__"),
    description="Objective over 30 days and the error budget it leaves (alerting/slos.yml).",
)
remaining_ts = timeseries(
    "Error budget remaining over time", [prom(_series(S.BUDGET_REMAINING), "{{slo}}")],
    unit="percentunit", min_zero=False, thresholds=[(None, "red"), (0, "transparent")],
)

page_windows = timeseries(
    "Page windows: burn rate over 1 h, 5 min, 6 h, 30 min",
    [prom(burn(w), "{{slo}} " + w) for w in ("1h", "5m", "6h", "30m")],
    thresholds=_factor_lines(6, 14.4),
    description="The page fires when 1 h AND 5 min are above 14.4, or 6 h AND 30 min above 6.",
)
ticket_windows = timeseries(
    "Ticket windows: burn rate over 1 d, 2 h, 3 d, 6 h",
    [prom(burn(w), "{{slo}} " + w) for w in ("1d", "2h", "3d", "6h")],
    thresholds=_factor_lines(1, 3),
    description="The ticket fires when 1 d AND 2 h are above 3, or 3 d AND 6 h above 1.",
)
period_burn = timeseries(
    "Burn rate over the period (30 days)", [prom(_series(S.PERIOD_BURN_RATE), "{{slo}}")],
    thresholds=_factor_lines(1), description="Above 1 the SLO is missed for the period.",
)

error_ratio = timeseries(
    "Error ratio (5 min, 1 h, 30 days)",
    [prom(_series(S.ratio_name(w)), "{{slo}} " + w) for w in ("5m", "1h", "30d")],
    unit="percentunit",
    description="Bad events / all events (the SLI's complement) over three windows.",
)
events = timeseries(
    "Events per second (5 min)",
    [prom(_series(S.TOTAL_RATE5M), "{{slo}} all"), prom(_series(S.ERRORS_RATE5M), "{{slo}} bad")],
    description="What the ratios are made of: all events and bad events per second.",
)

dashboard = build_dashboard(
    "slo",
    "SLOs and error budgets (alerting/slos.yml): budget left over 30 days, burn rate over every "
    "alert window, time to exhaustion and the error ratio, per SLO.",
    [
        Section("Error budget", [(remaining, 8, 7), (exhaustion, 8, 7), (current, 8, 7),
                                 (objectives, 8, 7), (remaining_ts, 16, 7)]),
        Section("Burn rate", [(page_windows, 12, 8), (ticket_windows, 12, 8), (period_burn, 24, 6)]),
        Section("Error ratio", [(error_ratio, 12, 7), (events, 12, 7)]),
    ],
    variables=[query_var("slo", "SLO", f"label_values({S.OBJECTIVE}, slo)")],
    annotations=[alerts_annotation()],
)
