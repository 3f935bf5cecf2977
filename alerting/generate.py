"""Render Prometheus rules, prometheus.yml and alertmanager.yml from ``alerting/rules.yml``.

``build(root, check)`` (called by ``mailgenius build``) writes the committed variants:

* ``prometheus/rules/recording.yml`` and ``prometheus/rules/<group>.yml`` (one per alert group)
* ``prometheus/prometheus.yml`` (local ports) and ``prometheus/prometheus.compose.yml``
* ``alertmanager/alertmanager.yml`` (local) and ``alertmanager/alertmanager.compose.yml``

:func:`render` produces any other :class:`Variant` (the end-to-end tests render one with 1 s
scrapes, short group waits and receivers on local sinks into a temporary directory; the stack
tests render one with moved ports).

Every output is a Jinja2 template under ``alerting/templates/``; values are inserted as JSON
scalars (valid YAML), and each rendered file is parsed back before it is returned.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jinja2
import yaml

from mailgenius import contract
from mailgenius.settings import rules_file

HERE = Path(__file__).resolve().parent
#: the one source of every alert
SOURCE = HERE / "rules.yml"
TEMPLATES = HERE / "templates"

#: scrape job -> default local port (docs/design.md "Processes, ports, dependencies"); every target gets service=<job>
LOCAL_PORTS = {
    "sender": 8001,
    "importer": 8002,
    "exporter": 9300,
    "sender-worker": 9191,
    "importer-worker": 9192,
    "scheduler": 9194,
    "postgres": 9187,
    "redis": 9121,
    "node": 9100,
    "alertmanager": 9093,
    "prometheus": 9090,
}
#: scrape job -> docker-compose service name that serves it
COMPOSE_HOSTS = {
    "sender": "sender",
    "importer": "importer",
    "exporter": "exporter",
    "sender-worker": "sender-worker",
    "importer-worker": "importer-worker",
    "scheduler": "scheduler",
    "postgres": "postgres-exporter",
    "redis": "redis-exporter",
    "node": "node-exporter",
    "alertmanager": "alertmanager",
    "prometheus": "localhost",
}
#: jobs whose metrics carry their own ``service`` label (the HTTP metrics of mailgenius.metrics):
#: Prometheus keeps it (honor_labels) instead of renaming it to ``exported_service`` beside the
#: target's service=<job>, which has the same value
SELF_LABELLED_JOBS = ("sender", "importer", "exporter")
#: jobs that may run as several replicas in docker-compose: discovered by DNS (every A record)
COMPOSE_REPLICATED = ("sender-worker", "importer-worker")

#: channel names an alert may list, and the Alertmanager integration each becomes
CHANNELS = ("email", "slack", "pagerduty", "watchdog")
#: the exporter's Alertmanager webhook path (docs/design.md "HTTP")
INCIDENT_WEBHOOK_PATH = "/api/alerts/webhook"
#: the exporter's built-in monitoring page: where dashboard links go when there is no Grafana
MONITORING_PAGE_PATH = "/dashboard/monitoring"

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d|w|y)$")


class RulesError(ValueError):
    """``rules.yml`` is inconsistent (unknown name, bad duration, missing field)."""


@dataclass(frozen=True)
class Variant:
    """Everything that differs between the local, compose and test renderings."""

    name: str = "local"
    #: scrape job -> list of host:port targets
    targets: dict[str, list[str]] = field(default_factory=lambda: {j: [f"127.0.0.1:{p}"] for j, p in LOCAL_PORTS.items()})
    #: scrape jobs discovered by DNS A records instead: job -> (name, port)
    dns_targets: dict[str, tuple[str, int]] = field(default_factory=dict)
    scrape_interval: str = "5s"
    evaluation_interval: str = "5s"
    #: rule files as Prometheus should load them (relative paths resolve against prometheus.yml)
    rule_files: tuple[str, ...] = ("rules/*.yml",)
    alertmanager_targets: tuple[str, ...] = ("127.0.0.1:9093",)
    smarthost: str = "127.0.0.1:1025"
    smtp_require_tls: bool = False
    incident_webhook_url: str = f"http://127.0.0.1:9300{INCIDENT_WEBHOOK_PATH}"
    #: the dead man's switch that must keep receiving the Watchdog (e.g. a healthchecks URL)
    watchdog_url: str = f"http://127.0.0.1:9300{INCIDENT_WEBHOOK_PATH}"
    #: directory holding the secret files Alertmanager reads at send time. Alertmanager 0.25
    #: resolves *_file paths against its working directory (the repository root for `make run`)
    secrets_dir: str = "var/secrets"
    #: send `Authorization: Bearer <secrets_dir/alert_webhook_token>` to the exporter's incident
    #: webhook (the exporter refuses it without); False only renders a config for tests
    incident_webhook_token: bool = True
    #: PagerDuty Events API v2 URL; empty = Alertmanager's default (PagerDuty itself)
    pagerduty_url: str = ""
    #: notification templates, relative to the alertmanager config file
    templates: tuple[str, ...] = ("templates/*.tmpl",)
    #: routing timings; None = rules.yml
    group_wait: str | None = None
    group_interval: str | None = None
    #: replace every alert's `for:` (end-to-end tests only; promtool tests check the real ones)
    for_override: str | None = None
    #: external URL of Grafana; None = rules.yml `links.grafana_url`; "" (or an empty
    #: links.grafana_url) = no Grafana: dashboard_url points at the built-in monitoring page
    grafana_url: str | None = None
    monitoring_url: str = f"http://127.0.0.1:9300{MONITORING_PAGE_PATH}"


def compose_variant() -> Variant:
    static = {j: [f"{COMPOSE_HOSTS[j]}:{p}"] for j, p in LOCAL_PORTS.items() if j not in COMPOSE_REPLICATED}
    dns = {j: (COMPOSE_HOSTS[j], LOCAL_PORTS[j]) for j in COMPOSE_REPLICATED}
    return Variant(
        name="compose",
        targets=static,
        dns_targets=dns,
        alertmanager_targets=("alertmanager:9093",),
        smarthost="smtp-sink:1025",
        incident_webhook_url=f"http://exporter:9300{INCIDENT_WEBHOOK_PATH}",
        watchdog_url=f"http://exporter:9300{INCIDENT_WEBHOOK_PATH}",
        secrets_dir="/etc/alertmanager/secrets",
    )


# -- loading and validating rules.yml ------------------------------------------------------------

def duration_seconds(value: str, where: str) -> int:
    m = _DURATION.match(str(value))
    if not m:
        raise RulesError(f"{where}: {value!r} is not a duration like 30s, 5m, 1h")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}[unit]


def canonical_duration(value: str, where: str) -> str:
    """Normalise to Prometheus' canonical spelling (300s -> 5m, 60s -> 1m)."""
    secs = duration_seconds(value, where)
    if secs == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs % size == 0:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def metric_names() -> dict[str, str]:
    """The metric-name constants of mailgenius.metrics (and the queue names)."""
    return contract.metric_names()


@dataclass
class Alert:
    name: str
    group: str
    severity: str
    expr: str
    for_: str
    cooldown: str
    channels: tuple[str, ...]
    labels: dict[str, str]
    annotations: dict[str, str]

    @property
    def key(self) -> str:
        return f"{self.name}/{self.severity}"


@dataclass
class Model:
    source: dict
    recording: list[dict]
    groups: dict[str, list[Alert]]

    @property
    def alerts(self) -> list[Alert]:
        return [a for g in self.groups.values() for a in g]


def dashboard_link(uid: str, grafana_url: str, monitoring_url: str) -> str:
    """Grafana's /d/<uid>, or the built-in monitoring page when no Grafana URL is configured."""
    if grafana_url:
        return f"{grafana_url.rstrip('/')}/d/{uid}"
    return f"{monitoring_url}?dashboard={uid}"


def load(path: Path = SOURCE, *, grafana_url: str | None = None,
         monitoring_url: str = Variant.monitoring_url) -> Model:
    """Parse rules.yml, render its expressions and apply the severity defaults."""
    src = yaml.safe_load(path.read_text())
    try:
        c = contract.parse(src, path)
    except contract.ContractError as exc:
        raise RulesError(str(exc)) from None

    def expr(text: str, where: str) -> str:
        try:
            return c.render(text, where)
        except contract.ContractError as exc:
            raise RulesError(str(exc)) from None

    recording = [{"record": r.series, "expr": r.expr} for r in c.recording.values()]

    links = src["links"]
    grafana = (links.get("grafana_url") or "") if grafana_url is None else grafana_url
    severities = src["severities"]
    groups: dict[str, list[Alert]] = {}
    seen: set[str] = set()
    for group, rows in src["groups"].items():
        for row in rows:
            name = row["name"]
            where = f"groups.{group}.{name}"
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", name):
                raise RulesError(f"{where}: alert names are PascalCase")
            sev = row["severity"]
            if sev not in severities:
                raise RulesError(f"{where}: unknown severity {sev!r}")
            defaults = severities[sev]
            channels = tuple(row.get("channels", defaults["channels"]))
            for ch in channels:
                if ch not in CHANNELS:
                    raise RulesError(f"{where}: unknown channel {ch!r} (known: {', '.join(CHANNELS)})")
            for req in ("summary", "description", "dashboard"):
                if not row.get(req):
                    raise RulesError(f"{where}: missing {req}")
            alert = Alert(
                name=name,
                group=group,
                severity=sev,
                expr=expr(row["expr"], where),
                for_=canonical_duration(row.get("for", defaults["for"]), where + ".for"),
                cooldown=canonical_duration(row.get("cooldown", defaults["cooldown"]), where + ".cooldown"),
                channels=channels,
                labels={"severity": sev},
                annotations={
                    # the texts may interpolate thresholds: [[ t.queue_waiting_messages ]]
                    "summary": expr(row["summary"], where + ".summary"),
                    "description": expr(row["description"], where + ".description"),
                    "runbook_url": f"{links['runbook_base_url'].rstrip('/')}/{name}.md",
                    "dashboard_url": dashboard_link(row["dashboard"], grafana, monitoring_url),
                },
            )
            if alert.key in seen:
                raise RulesError(f"{where}: {name} with severity {sev} is defined twice")
            seen.add(alert.key)
            groups.setdefault(group, []).append(alert)
    return Model(src, recording, groups)


# -- rendering -----------------------------------------------------------------------------------

def _scalar(value: Any) -> str:
    """A YAML scalar: JSON strings are valid double-quoted YAML."""
    return json.dumps(value)


def _single(value: str) -> str:
    """A single-quoted YAML scalar (reads best for matchers and Go templates full of ")."""
    return "'" + str(value).replace("'", "''") + "'"


def _block(value: str, indent: int) -> str:
    """A multi-line string as a YAML literal block, else a quoted scalar."""
    value = str(value)
    if "\n" not in value:
        return _single(value)
    pad = " " * indent
    return "|-\n" + "\n".join(pad + line if line else "" for line in value.splitlines())


def templates_env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["q"] = _scalar
    env.filters["block"] = _block
    env.filters["sq"] = _single
    return env


#: Go templates of the notifications (defined in alertmanager/templates/mailgenius.tmpl)
GO_TEMPLATES = {
    "email_subject": '{{ template "mailgenius.email.subject" . }}',
    "email_html": '{{ template "mailgenius.email.html" . }}',
    "email_text": '{{ template "mailgenius.email.text" . }}',
    "slack_title": '{{ template "mailgenius.slack.title" . }}',
    "slack_titlelink": '{{ template "mailgenius.slack.titlelink" . }}',
    "slack_text": '{{ template "mailgenius.slack.text" . }}',
    "slack_color": '{{ template "mailgenius.slack.color" . }}',
    "pd_severity": '{{ if eq .CommonLabels.severity "critical" }}critical{{ else }}warning{{ end }}',
    "pd_details": {
        "summary": "{{ .CommonAnnotations.summary }}",
        "description": "{{ .CommonAnnotations.description }}",
        "runbook_url": "{{ .CommonAnnotations.runbook_url }}",
        "dashboard_url": "{{ .CommonAnnotations.dashboard_url }}",
        "firing": "{{ .Alerts.Firing | len }}",
    },
}


def route_group_interval(cooldown: str, global_interval: str, where: str) -> str | None:
    """The group_interval a route needs so that a still-firing alert is re-sent every
    ``cooldown``; None when the global one does.

    Alertmanager re-sends a still-firing group only on a group_interval tick, and only when
    more than repeat_interval has passed since the last notification was logged (which is a
    little after the tick it was sent on). With the global 5 min interval, the documented 60 s
    of DatabaseConnectionsHigh and 1 min of the Watchdog became 5 min; with an interval equal
    to the cooldown, twice the cooldown. A tick just after the cooldown (cooldown + 5 %, at
    least 1 s) re-sends at the cooldown, late by that margin only."""
    secs = duration_seconds(cooldown, where)
    if secs >= duration_seconds(global_interval, "group_interval"):
        return None
    return canonical_duration(f"{secs + max(1, secs // 20)}s", where)


def _receiver_name(channels: tuple[str, ...]) -> str:
    return "-".join(channels)


def default_source() -> Path:
    """The rules.yml every reader uses: ``$MAILGENIUS_RULES_FILE``, else alerting/rules.yml."""
    return Path(rules_file() or SOURCE)


def render(variant: Variant | None = None, *, source: Path | None = None,
           slo_source: Path | None = None) -> dict[str, str]:
    """Relative path -> text of every generated file of one variant (with the SLOs of
    alerting/slos.yml: their own rule file, routed like every other alert)."""
    from . import slo

    variant = variant or Variant()
    model = load(source or default_source(), grafana_url=variant.grafana_url, monitoring_url=variant.monitoring_url)
    slos = slo.load(slo_source or slo.SOURCE, rules=model.source, grafana_url=variant.grafana_url,
                    monitoring_url=variant.monitoring_url)
    env = templates_env()
    src = model.source
    out: dict[str, str] = {}

    header = f"# GENERATED by `mailgenius build` from alerting/rules.yml ({variant.name} variant): do not edit.\n"
    out["prometheus/rules/recording.yml"] = env.get_template("recording.yml.j2").render(
        header=header, rules=model.recording)
    for group, alerts in model.groups.items():
        if variant.for_override is not None:
            alerts = [replace(a, for_=variant.for_override) for a in alerts]
        out[f"prometheus/rules/{group}.yml"] = env.get_template("alerts.yml.j2").render(
            header=header, group=group, alerts=alerts)

    out[slo.RULE_FILE] = slo.render_rules(slos, header.replace("alerting/rules.yml", "alerting/slos.yml"),
                                          for_override=variant.for_override)

    # the compose variant lives beside the local one; any other variant is rendered elsewhere
    suffix = ".compose" if variant.name == "compose" else ""
    out[f"prometheus/prometheus{suffix}.yml"] = env.get_template("prometheus.yml.j2").render(
        header=header, v=variant, jobs=sorted(set(variant.targets) | set(variant.dns_targets)),
        self_labelled=SELF_LABELLED_JOBS)

    routing = src["routing"]
    receivers: dict[str, tuple[str, ...]] = {}
    routes = []
    global_interval = canonical_duration(variant.group_interval or routing["group_interval"], "group_interval")
    for a in model.alerts + slos.alerts:
        name = _receiver_name(a.channels)
        receivers[name] = a.channels
        routes.append({"alertname": a.name, "severity": a.severity, "receiver": name,
                       "repeat_interval": a.cooldown,
                       "group_interval": route_group_interval(a.cooldown, global_interval, a.key)})
    default_receiver = _receiver_name(tuple(src["severities"]["warning"]["channels"]))
    receivers.setdefault(default_receiver, tuple(src["severities"]["warning"]["channels"]))
    critical_receiver = _receiver_name(tuple(src["severities"]["critical"]["channels"]))
    receivers.setdefault(critical_receiver, tuple(src["severities"]["critical"]["channels"]))
    secrets = variant.secrets_dir.rstrip("/")
    if not variant.pagerduty_url and src["channels"]["pagerduty"].get("url"):
        variant = replace(variant, pagerduty_url=src["channels"]["pagerduty"]["url"])
    if src["channels"].get("watchdog", {}).get("url") and variant.watchdog_url == variant.incident_webhook_url:
        variant = replace(variant, watchdog_url=src["channels"]["watchdog"]["url"])
    out[f"alertmanager/alertmanager{suffix}.yml"] = env.get_template("alertmanager.yml.j2").render(
        header=header, v=variant, routing=routing, go=GO_TEMPLATES,
        group_wait=canonical_duration(variant.group_wait or routing["group_wait"], "group_wait"),
        group_interval=global_interval,
        resolve_timeout=canonical_duration(routing["resolve_timeout"], "resolve_timeout"),
        default_receiver=default_receiver, critical_receiver=critical_receiver,
        critical_repeat=canonical_duration(src["severities"]["critical"]["cooldown"], "cooldown"),
        default_repeat=canonical_duration(src["severities"]["warning"]["cooldown"], "cooldown"),
        incident_receiver=routing["incident_channel"],
        routes=routes, receivers=sorted(receivers.items()), channels=src["channels"],
        slack_api_url_file=f"{secrets}/slack_api_url",
        pagerduty_routing_key_file=f"{secrets}/pagerduty_routing_key",
        smtp_password_file=f"{secrets}/smtp_password",
        incident_token_file=f"{secrets}/alert_webhook_token" if variant.incident_webhook_token else "",
    )
    for path, text in out.items():
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as exc:  # a template bug, not a user error: fail loudly
            raise RulesError(f"rendered {path} is not valid YAML: {exc}") from None
    return out


def committed_files() -> dict[str, str]:
    """Every generated file that lives in the repository (local rules + both variants)."""
    files = render(Variant())
    for path, text in render(compose_variant()).items():
        files.setdefault(path, text)
    return files


def write(files: dict[str, str], root: Path, *, check: bool = False) -> list[Path]:
    """Write the files under root; return those that changed (with check, write nothing)."""
    changed = []
    for rel, text in sorted(files.items()):
        path = root / rel
        if path.exists() and path.read_text() == text:
            continue
        changed.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return changed


def stale_rule_files(root: Path, files: dict[str, str]) -> list[Path]:
    """Generated rule files left behind by a group that no longer exists."""
    rules_dir = root / "prometheus" / "rules"
    if not rules_dir.is_dir():
        return []
    wanted = {root / p for p in files if p.startswith("prometheus/rules/")}
    return [p for p in sorted(rules_dir.glob("*.yml")) if p not in wanted]


def build(root: Path, check: bool = False) -> list[Path]:
    """`mailgenius build`: render the committed files; return the paths that changed."""
    files = committed_files()
    changed = write(files, root, check=check)
    for stale in stale_rule_files(root, files):
        changed.append(stale)
        if not check:
            stale.unlink()
    return changed


#: the notification templates in the repository (absolute, for configs rendered elsewhere)
REPO_TEMPLATES = str(HERE.parent / "alertmanager" / "templates" / "*.tmpl")


def local_variant(*, host: str = "127.0.0.1", ports: dict[str, int] | None = None, **changes) -> Variant:
    """The local variant with some ports moved (``ports``: job -> port; ``"smtp"`` moves the
    smarthost), for stacks started on free ports. Templates point into this repository."""
    p = {**LOCAL_PORTS, "smtp": 1025, **(ports or {})}
    base = dict(
        name="local",
        targets={j: [f"{host}:{p[j]}"] for j in LOCAL_PORTS},
        alertmanager_targets=(f"{host}:{p['alertmanager']}",),
        smarthost=f"{host}:{p['smtp']}",
        incident_webhook_url=f"http://{host}:{p['exporter']}{INCIDENT_WEBHOOK_PATH}",
        # MAILGENIUS_WATCHDOG_URL: an external dead man's switch that must keep receiving the
        # Watchdog (a heartbeat monitor that pages when the pings stop); unset: the exporter
        watchdog_url=os.environ.get("MAILGENIUS_WATCHDOG_URL")
        or f"http://{host}:{p['exporter']}{INCIDENT_WEBHOOK_PATH}",
        templates=(REPO_TEMPLATES,),
        # MAILGENIUS_GRAFANA_URL: links to your Grafana; unset: to the exporter's monitoring page
        grafana_url=os.environ.get("MAILGENIUS_GRAFANA_URL", ""),
        monitoring_url=f"http://{host}:{p['exporter']}{MONITORING_PAGE_PATH}",
    )
    base.update(changes)
    return Variant(**base)


def render_to(out_dir: Path, variant: Variant, *, source: Path | None = None) -> dict[str, Path]:
    """Render one variant into ``out_dir`` (prometheus/..., alertmanager/...); returns the
    written paths by kind: ``prometheus``, ``alertmanager``, ``rules`` (the rules directory)."""
    out_dir = Path(out_dir)
    files = render(variant, source=source)
    write(files, out_dir)
    return {
        "prometheus": out_dir / "prometheus" / "prometheus.yml",
        "alertmanager": out_dir / "alertmanager" / "alertmanager.yml",
        "rules": out_dir / "prometheus" / "rules",
    }
