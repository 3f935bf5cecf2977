"""SLOs and error budgets: ``alerting/slos.yml`` -> ``prometheus/rules/slo.yml`` (docs/slos.md).

Called by :func:`alerting.generate.render` beside ``rules.yml``. Per SLO one rule group, in this
order (rules of a group evaluate in order, so every rule reads series recorded in the same
evaluation, never one evaluation late):

1. ``slo:sli_errors:rate5m`` and ``slo:sli_total:rate5m`` (bad and all events per second),
2. ``slo:sli_error:ratio_rate<w>`` for w in :data:`WINDOWS` (bad / all events over w),
3. the budget figures over the period: ``slo:sli_error:ratio_rate30d`` (traffic-weighted, from
   the 5m rates), objective, budget, burn rates, budget remaining, time to exhaustion,
4. the two alerts, both named ``alert`` (default ``Slo<Name>BudgetBurn``): the page (critical)
   and the ticket (warning), each firing when a long AND a short window burn faster than a factor.

Every series and alert carries ``slo="<name>"``. The alerts join the Alertmanager tree with the
defaults of their severity (rules.yml ``severities``), like any alert of rules.yml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

import jinja2
import yaml

from mailgenius.contract import expr_env, metric_names
from mailgenius.slo_series import (  # noqa: F401  (re-exported)
    BUDGET_EXHAUSTION,
    BUDGET_REMAINING,
    CURRENT_BURN_RATE,
    CURRENT_WINDOW,
    ERROR_BUDGET,
    ERROR_RATIO,
    ERRORS_RATE5M,
    OBJECTIVE,
    PERIOD_BURN_RATE,
    PERIOD_DAYS,
    TOTAL_RATE5M,
    ratio_name,
)

from .generate import (
    Alert,
    RulesError,
    Variant,
    canonical_duration,
    dashboard_link,
    duration_seconds,
    templates_env,
)

HERE = Path(__file__).resolve().parent
#: the one source of every SLO
SOURCE = HERE / "slos.yml"
#: the generated rule file (one group per SLO)
RULE_FILE = "prometheus/rules/slo.yml"
#: the windows whose error ratio is recorded (every window an alert pairs must be one of them)
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
#: Grafana uid of the "SLOs and error budgets" dashboard (dashboards/slo.dashboard.py)
DASHBOARD = "slo"

# the recorded series' names (ERROR_RATIO, OBJECTIVE, ..., ratio_name) live in mailgenius/slo_series.py:
# the dashboard and the monitoring page read them too; they are imported above

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def alert_name(slo_name: str) -> str:
    """api-availability -> SloApiAvailabilityBudgetBurn."""
    return "Slo" + "".join(part.capitalize() for part in slo_name.split("-")) + "BudgetBurn"


@dataclass(frozen=True)
class BurnAlert:
    """One of the two alerts of every SLO (slos.yml ``alerts``)."""

    kind: str  # page | ticket
    severity: str
    for_: str
    #: (long window, short window, burn factor)
    windows: tuple[tuple[str, str, Decimal], ...]


@dataclass
class Slo:
    name: str
    #: percent, e.g. 99.9
    objective: Decimal
    description: str
    #: PromQL of bad events per second and all events per second, with ``$window`` left in
    errors: str
    total: str
    alert: str
    dashboard: str

    @property
    def budget(self) -> Decimal:
        """The error budget as a ratio (99.9 % -> 0.001), exact."""
        return (Decimal(100) - self.objective) / Decimal(100)

    @property
    def objective_ratio(self) -> Decimal:
        return self.objective / Decimal(100)

    def errors_at(self, window: str) -> str:
        return self.errors.replace("$window", window)

    def total_at(self, window: str) -> str:
        return self.total.replace("$window", window)

    @property
    def selector(self) -> str:
        return f'{{slo="{self.name}"}}'


@dataclass
class SloModel:
    period: str
    slos: list[Slo]
    burn_alerts: list[BurnAlert]
    alerts: list[Alert]

    @property
    def period_seconds(self) -> int:
        return duration_seconds(self.period, "period")


def _num(value: Decimal) -> str:
    """A Decimal as PromQL writes it (0.001, 14.4, 6, 100)."""
    return format(value.normalize(), "f")


def _paren(expr: str) -> str:
    expr = expr.strip()
    return f"({expr})" if "\n" not in expr else "(\n  " + expr.replace("\n", "\n  ") + "\n)"


def _load_alerts(src: dict) -> list[BurnAlert]:
    out = []
    spec = src.get("alerts") or {}
    for kind in ("page", "ticket"):
        row = spec.get(kind)
        where = f"slos.yml alerts.{kind}"
        if not row:
            raise RulesError(f"{where}: missing")
        windows = []
        for item in row.get("windows") or []:
            if not (isinstance(item, list) and len(item) == 3):
                raise RulesError(f"{where}.windows: each entry is [long, short, factor]; got {item!r}")
            long_w, short_w, factor = (canonical_duration(str(item[0]), where), canonical_duration(str(item[1]), where), item[2])
            for w in (long_w, short_w):
                if w not in WINDOWS:
                    raise RulesError(f"{where}: window {w} is not recorded (recorded: {', '.join(WINDOWS)})")
            if duration_seconds(long_w, where) <= duration_seconds(short_w, where):
                raise RulesError(f"{where}: the long window {long_w} must be longer than the short one {short_w}")
            try:
                f = Decimal(str(factor))
            except InvalidOperation:
                raise RulesError(f"{where}: burn factor {factor!r} is not a number") from None
            if f <= 0:
                raise RulesError(f"{where}: burn factor {factor!r} must be positive")
            windows.append((long_w, short_w, f))
        if not windows:
            raise RulesError(f"{where}: no windows")
        out.append(BurnAlert(kind, str(row["severity"]), canonical_duration(str(row.get("for", "0s")), where + ".for"),
                             tuple(windows)))
    return out


def load(path: Path = SOURCE, *, rules: dict, grafana_url: str | None = None,
         monitoring_url: str | None = None) -> SloModel:
    """Parse slos.yml (``rules``: the parsed rules.yml, for links and severity defaults)."""
    src = yaml.safe_load(path.read_text()) or {}
    env = expr_env()
    m = metric_names()
    s = src.get("selectors") or {}
    period = canonical_duration(str(src.get("period", "30d")), "slos.yml period")
    burn_alerts = _load_alerts(src)
    severities = rules["severities"]
    for b in burn_alerts:
        if b.severity not in severities:
            raise RulesError(f"slos.yml alerts.{b.kind}: unknown severity {b.severity!r}")
    links = rules["links"]
    grafana = (links.get("grafana_url") or "") if grafana_url is None else grafana_url
    monitoring = monitoring_url or Variant.monitoring_url

    def expr(text, where: str) -> str:
        if not text or not str(text).strip():
            raise RulesError(f"{where}: missing")
        try:
            out = env.from_string(str(text).strip()).render(m=m, s=s)
        except jinja2.UndefinedError as exc:
            raise RulesError(f"{where}: {exc.message}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise RulesError(f"{where}: {exc.message}") from None
        if "$window" not in out:
            raise RulesError(f"{where}: no $window (each query is evaluated over every window)")
        return out

    slos: list[Slo] = []
    alerts: list[Alert] = []
    seen: set[str] = set()
    for row in src.get("slos") or []:
        name = str(row.get("name", ""))
        where = f"slos.{name or '?'}"
        if not _NAME.match(name):
            raise RulesError(f"{where}: SLO names are kebab-case (api-availability)")
        if name in seen:
            raise RulesError(f"{where}: defined twice")
        seen.add(name)
        try:
            objective = Decimal(str(row.get("objective")))
        except InvalidOperation:
            raise RulesError(f"{where}: objective {row.get('objective')!r} is not a percentage") from None
        if not (Decimal(0) < objective < Decimal(100)):
            raise RulesError(f"{where}: objective must be a percentage between 0 and 100 (99.9); "
                             f"got {row.get('objective')!r}")
        if not row.get("description"):
            raise RulesError(f"{where}: missing description")
        if ("errors" in row) == ("good" in row):
            raise RulesError(f"{where}: give exactly one of `errors` (bad events) or `good` (good events)")
        total = expr(row.get("total"), where + ".total")
        if "errors" in row:
            errors = expr(row["errors"], where + ".errors")
        else:
            errors = f"{_paren(total)}\n  -\n{_paren(expr(row['good'], where + '.good'))}"
        aname = str(row.get("alert") or alert_name(name))
        if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", aname):
            raise RulesError(f"{where}: alert names are PascalCase")
        slo = Slo(name, objective, str(row["description"]).strip(), errors, total, aname,
                  str(row.get("dashboard") or DASHBOARD))
        slos.append(slo)
        for b in burn_alerts:
            d = severities[b.severity]
            alerts.append(Alert(
                name=aname, group="slo", severity=b.severity, expr=alert_expr(slo, b), for_=b.for_,
                cooldown=canonical_duration(d["cooldown"], where + ".cooldown"), channels=tuple(d["channels"]),
                labels={"severity": b.severity, "slo": name},
                annotations={
                    "summary": f"SLO {name}: error budget burning {'fast' if b.kind == 'page' else 'slowly'} ({b.kind}).",
                    "description": description(slo, b, period),
                    "runbook_url": f"{links['runbook_base_url'].rstrip('/')}/{aname}.md",
                    "dashboard_url": dashboard_link(slo.dashboard, grafana, monitoring),
                },
            ))
    if not slos:
        raise RulesError("slos.yml: no SLOs")
    return SloModel(period, slos, burn_alerts, alerts)


def description(slo: Slo, b: BurnAlert, period: str) -> str:
    pairs = ", or ".join(f"{_num(f)}x over {lw} and {sw}" for lw, sw, f in b.windows)
    return (f"SLO {slo.name} ({_num(slo.objective)} % over {period}: {slo.description.rstrip('.')}) burns its "
            f'error budget {{{{ $value | printf "%.1f" }}}} times faster than sustainable ({b.kind} when {pairs}).')


def alert_expr(slo: Slo, b: BurnAlert) -> str:
    """Long AND short window above the factor, for any pair; the value is the long window's burn rate."""
    budget = _num(slo.budget)
    branches = []
    for long_w, short_w, factor in b.windows:
        f = _num(factor)
        branches.append(
            f"(\n  {ratio_name(long_w)}{slo.selector} / {budget} > {f}\n    and\n"
            f"  {ratio_name(short_w)}{slo.selector} / {budget} > {f}\n)")
    return "\nor\n".join(branches)


def recording_rules(slo: Slo, period: str, period_seconds: int) -> list[dict]:
    """The recording rules of one SLO, in evaluation order."""
    sel = slo.selector
    budget = _num(slo.budget)

    def zero_filled(errors: str, total: str) -> str:
        # a bad-event counter that never moved may have no series yet: count it as 0
        return f"{_paren(errors)}\n  or on ()\n0 * {_paren(total)}"

    rules = [
        {"record": ERRORS_RATE5M, "expr": zero_filled(slo.errors_at("5m"), slo.total_at("5m"))},
        {"record": TOTAL_RATE5M, "expr": slo.total_at("5m")},
        {"record": ratio_name("5m"), "expr": f"{ERRORS_RATE5M}{sel} / {TOTAL_RATE5M}{sel}"},
    ]
    for w in WINDOWS[1:]:
        rules.append({"record": ratio_name(w),
                      "expr": f"{_paren(zero_filled(slo.errors_at(w), slo.total_at(w)))}\n  /\n{_paren(slo.total_at(w))}"})
    rules += [
        # traffic-weighted over the period: every event counts once, quiet hours do not dilute it
        {"record": ratio_name(period),
         "expr": f"sum_over_time({ERRORS_RATE5M}{sel}[{period}])\n  /\nsum_over_time({TOTAL_RATE5M}{sel}[{period}])"},
        {"record": OBJECTIVE, "expr": f"vector({_num(slo.objective_ratio)})"},
        {"record": ERROR_BUDGET, "expr": f"vector({budget})"},
        {"record": PERIOD_DAYS, "expr": f"vector({_num(Decimal(period_seconds) / 86400)})"},
        {"record": CURRENT_BURN_RATE, "expr": f"{ratio_name(CURRENT_WINDOW)}{sel} / {budget}"},
        {"record": PERIOD_BURN_RATE, "expr": f"{ratio_name(period)}{sel} / {budget}"},
        {"record": BUDGET_REMAINING, "expr": f"1 - {PERIOD_BURN_RATE}{sel}"},
        {"record": BUDGET_EXHAUSTION,
         "expr": f"clamp_min({BUDGET_REMAINING}{sel}, 0) * {period_seconds}\n  /\n({CURRENT_BURN_RATE}{sel} > 0)"},
    ]
    for r in rules:
        r["labels"] = {"slo": slo.name}
    return rules


def group_name(slo: Slo) -> str:
    return f"mailgenius-slo-{slo.name}"


def render_rules(model: SloModel, header: str, *, for_override: str | None = None) -> str:
    """The text of prometheus/rules/slo.yml."""
    groups = []
    for slo in model.slos:
        alerts = [a for a in model.alerts if a.labels["slo"] == slo.name]
        if for_override is not None:
            alerts = [replace(a, for_=for_override) for a in alerts]
        groups.append({"name": group_name(slo), "slo": slo,
                       "rules": recording_rules(slo, model.period, model.period_seconds), "alerts": alerts})
    return templates_env().get_template("slo.yml.j2").render(header=header, groups=groups, period=model.period)
