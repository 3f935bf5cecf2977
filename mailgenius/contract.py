"""The contract of every figure more than one reader shows, loaded from ``alerting/rules.yml``.

``alerting/rules.yml`` is the one source of thresholds (``thresholds:``), series selectors
(``selectors:``) and the recorded series shared by alerts and readers (``recording:``). Alerts,
dashboards, the operator summary (``/api/monitoring/metrics``), the monitoring page, the health
checks and the report all read them from here instead of retyping a number or a selector, so
moving a threshold in ``rules.yml`` and running ``mailgenius build`` moves it everywhere.

    from mailgenius import contract
    c = contract.get()
    c.threshold("queue_waiting_messages")     # 1000
    c.selector("filesystems")                 # 'fstype!~"tmpfs|...",mountpoint!~"..."'
    c.series("api_latency_p95")               # the recording rule's series name

``MAILGENIUS_RULES_FILE`` points at another ``rules.yml`` (tests, a site's own thresholds).
The recording rules' expressions are Jinja2 with ``[[ ]]`` delimiters (see rules.yml); this
module renders them, and ``alerting/generate.py`` writes them to ``prometheus/rules/``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import jinja2
import yaml

from . import metrics
from .settings import RULES_FILE_VARIABLE, rules_file

#: the one source (a sibling package's data file: installed with it, see pyproject's package-data)
SOURCE = Path(__file__).resolve().parent.parent / "alerting" / "rules.yml"
#: environment variable naming another rules.yml
ENV = RULES_FILE_VARIABLE

_WINDOW = re.compile(r"_rate(\d+[smhdw])$")


class ContractError(ValueError):
    """``rules.yml`` names something that does not exist (a threshold, selector, metric...)."""


def metric_names() -> dict[str, str]:
    """The metric-name constants of :mod:`mailgenius.metrics` (and the queue names)."""
    return {k: v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str)}


def expr_env() -> jinja2.Environment:
    """Jinja2 with ``[[ ]]`` delimiters (PromQL and Go templates keep ``{{ }}``)."""
    env = jinja2.Environment(variable_start_string="[[", variable_end_string="]]",
                             block_start_string="[%", block_end_string="%]",
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    env.filters["pct"] = percent
    env.filters["ms"] = milliseconds
    env.filters["num"] = number
    return env


def number(value: float) -> str:
    """1000 -> "1000", 0.5 -> "0.5" (no trailing zeros)."""
    return f"{float(value):g}" if float(value) != int(value) else str(int(value))


def percent(ratio: float) -> str:
    """A ratio as the alert texts write it: 0.8 -> "80 %", 0.001 -> "0.1 %"."""
    return f"{round(float(ratio) * 100, 6):g} %"


def milliseconds(seconds: float) -> str:
    """0.5 -> "500 ms"."""
    return f"{round(float(seconds) * 1000, 3):g} ms"


@dataclass(frozen=True)
class Recorded:
    """One recording rule: its key in rules.yml, the series it records, and its expression."""

    key: str
    series: str
    expr: str
    #: labels the series keeps (its aggregation level), e.g. ("service",); () for one series
    by: tuple[str, ...] = ()

    @property
    def window(self) -> str | None:
        """The rate window the series averages over ("5m", "1h"...), None for a gauge ratio."""
        m = _WINDOW.search(self.series.rsplit(":", 1)[-1])
        return m.group(1) if m else None


@dataclass(frozen=True)
class Contract:
    path: Path
    thresholds: Mapping[str, float]
    selectors: Mapping[str, str]
    recording: Mapping[str, Recorded] = field(default_factory=dict)

    def threshold(self, name: str) -> float:
        try:
            return self.thresholds[name]
        except KeyError:
            raise ContractError(f"{self.path}: no threshold {name!r} (known: {', '.join(sorted(self.thresholds))})") from None

    def selector(self, name: str) -> str:
        try:
            return self.selectors[name]
        except KeyError:
            raise ContractError(f"{self.path}: no selector {name!r} (known: {', '.join(sorted(self.selectors))})") from None

    def recorded(self, key: str) -> Recorded:
        try:
            return self.recording[key]
        except KeyError:
            raise ContractError(f"{self.path}: no recording rule {key!r} (known: {', '.join(sorted(self.recording))})") from None

    def series(self, key: str, selector: str = "") -> str:
        """The recorded series of ``key`` as a PromQL selector (with an optional matcher)."""
        name = self.recorded(key).series
        return f"{name}{{{selector}}}" if selector else name

    def label_values(self, selector: str, label: str) -> frozenset[str]:
        """The values a selector's ``label="x"`` / ``label=~"a|b"`` matcher accepts, e.g. the
        providers of ``delivery_reporting`` (the ones with delivery receipts)."""
        m = re.search(label + r'\s*(=~|=)\s*"([^"]*)"', self.selector(selector))
        if not m:
            raise ContractError(f"{self.path}: selector {selector!r} has no {label}= matcher")
        return frozenset(m.group(2).split("|")) if m.group(1) == "=~" else frozenset([m.group(2)])

    @property
    def receipt_providers(self) -> frozenset[str]:
        """Providers that report delivered / delayed / complained (the others cannot know)."""
        return self.label_values("delivery_reporting", "provider")

    def render(self, text: str, where: str = "rules.yml") -> str:
        """Render a ``[[ ]]`` template of rules.yml with m (metrics), t, s and r (recorded series)."""
        return _render(expr_env(), text, where, t=self.thresholds, s=self.selectors,
                       r={k: v.series for k, v in self.recording.items()})


def _render(env, text: str, where: str, **names) -> str:
    try:
        return env.from_string(str(text).strip()).render(m=metric_names(), **names)
    except jinja2.UndefinedError as exc:
        raise ContractError(f"{where}: {exc.message}") from None


_BY = re.compile(r"\b(?:sum|avg|max|min|count)\s+by\s*\(([^()]*)\)")


def _level(series: str, expr: str) -> tuple[str, ...]:
    """Labels a recorded series keeps: those of its outermost ``by (...)`` (le dropped)."""
    m = _BY.search(expr)
    if not m:
        return ()
    return tuple(x.strip() for x in m.group(1).split(",") if x.strip() and x.strip() != "le")


def parse(source: dict, path: Path) -> Contract:
    thresholds = dict(source.get("thresholds") or {})
    selectors = dict(source.get("selectors") or {})
    for name, value in thresholds.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ContractError(f"{path}: threshold {name!r} must be a number, got {value!r}")
    env = expr_env()
    recording: dict[str, Recorded] = {}
    rnames: dict[str, str] = {}
    for key, rule in (source.get("recording") or {}).items():
        expr = _render(env, rule["expr"], f"recording.{key}", t=thresholds, s=selectors, r=rnames)
        recording[key] = Recorded(key, rule["record"], expr, _level(rule["record"], expr))
        rnames[key] = rule["record"]
    return Contract(path, MappingProxyType(thresholds), MappingProxyType(selectors), MappingProxyType(recording))


def load(path: str | Path | None = None) -> Contract:
    """The contract of ``path`` (default: ``$MAILGENIUS_RULES_FILE``, else alerting/rules.yml)."""
    p = Path(path or rules_file() or SOURCE)
    try:
        source = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ContractError(f"cannot read the contract {p}: {exc.strerror}") from None
    return parse(source, p)


@functools.cache
def _cached(path: str) -> Contract:
    return load(path)


def get() -> Contract:
    """The process's contract (read once per file)."""
    return _cached(str(rules_file() or SOURCE))
