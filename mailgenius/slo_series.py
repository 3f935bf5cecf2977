"""The names of the series the SLO rules record (alerting/slo.py renders those rules into
prometheus/rules/slo.yml): the SLO dashboard and the monitoring page read them, so they live in the
kernel, below both the tools and the services."""

from __future__ import annotations

#: bad / good+bad events per second over 5 minutes
ERRORS_RATE5M = "slo:sli_errors:rate5m"
TOTAL_RATE5M = "slo:sli_total:rate5m"
#: prefix of the error ratio over a window: ``slo:sli_error:ratio_rate5m`` ... ``_rate3d``, ``_rate30d``
ERROR_RATIO = "slo:sli_error:ratio_rate"
OBJECTIVE = "slo:objective:ratio"
ERROR_BUDGET = "slo:error_budget:ratio"
PERIOD_DAYS = "slo:time_period:days"
#: error ratio of the last hour / budget (1 = the budget lasts exactly the period)
CURRENT_BURN_RATE = "slo:current_burn_rate:ratio"
#: error ratio of the period / budget
PERIOD_BURN_RATE = "slo:period_burn_rate:ratio"
#: share of the period's budget left (1 - period burn rate; negative once overspent)
BUDGET_REMAINING = "slo:period_error_budget_remaining:ratio"
#: seconds until the remaining budget is spent at the current burn rate (absent when not burning)
BUDGET_EXHAUSTION = "slo:error_budget_exhaustion:seconds"
#: the window of the current burn rate
CURRENT_WINDOW = "1h"


def ratio_name(window: str) -> str:
    return f"{ERROR_RATIO}{window}"
