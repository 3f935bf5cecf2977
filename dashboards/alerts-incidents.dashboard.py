"""5. Alerts & Incidents: active alerts, alert rules, incident timeline, MTTR / MTBF and the
notification path through Alertmanager."""

from dashboards.helpers import (
    PROMETHEUS,
    AlertGroupsPanel,
    AlertListPanel,
    Section,
    build_dashboard,
    high_bad,
    increase,
    prom,
    rate,
    stat,
    state_timeline,
    status_mapping,
    table,
    timeseries,
)
from mailgenius import metrics as M

#: Watchdog always fires by design (it proves the alert path); it is not an incident.
REAL = 'alertstate="firing",alertname!="Watchdog"'

firing = stat(
    "Firing alerts", [prom(f"count(ALERTS{{{REAL}}}) or vector(0)")],
    thresholds=[(None, "green"), (1, "red")], graph=True,
)
pending = stat(
    "Pending alerts", [prom('count(ALERTS{alertstate="pending"}) or vector(0)')],
    thresholds=[(None, "green"), (1, "orange")],
    description="Conditions that hold but have not yet lasted their `for:` window.",
)
by_severity = stat(
    "Firing by severity", [prom(f"count by (severity) (ALERTS{{{REAL}}})", "{{severity}}")],
    text_mode="value_and_name", description="Empty when nothing fires.",
)
watchdog = stat(
    "Alert pipeline (Watchdog)", [prom('count(ALERTS{alertname="Watchdog",alertstate="firing"}) or vector(0)')],
    mappings=status_mapping({1: ("OK", "green"), 0: ("BROKEN", "red")}), thresholds=[(None, "red"), (1, "green")],
    description="The Watchdog alert always fires; when it stops, rule evaluation is broken.",
)
active_table = table(
    "Active alerts", [prom('ALERTS{alertstate=~"firing|pending"}', instant=True, fmt="table")],
    hide=("Time", "__name__", "Value"),
)
am_alerts = stat(
    "Alertmanager alerts", [prom('sum by (state) (alertmanager_alerts)', "{{state}}")],
    text_mode="value_and_name", description="Alerts Alertmanager holds (active, suppressed).",
)

am_groups = AlertGroupsPanel(
    title="Alertmanager alert groups",
    description="What Alertmanager holds now, grouped as it routes them (from the Alertmanager "
                "datasource); silence or inspect them in Grafana's Alerting view.",
)
rules = AlertListPanel(
    title="Alert rules (all states)",
    description="Every rule Prometheus evaluates (rendered from alerting/rules.yml), read through "
                "Grafana's Prometheus ruler API.",
)
rule_groups = table(
    "Rule groups", [prom("sum by (rule_group) (prometheus_rule_group_rules)", instant=True, fmt="table"),
                    prom("max by (rule_group) (prometheus_rule_group_last_duration_seconds)", instant=True, fmt="table")],
    description="Value #A: rules in the group; #B: last evaluation time (s).",
)
rule_failures = timeseries(
    "Rule evaluation failures", [prom(rate("prometheus_rule_evaluation_failures_total", "", "rule_group"),
                                      "{{rule_group}}")],
    unit="ops",
)

timeline = state_timeline(
    "Incident timeline (firing alerts)",
    [prom(f"max by (alertname) (ALERTS{{{REAL}}})", "{{alertname}}")],
    mappings=status_mapping({1: ("firing", "red")}),
    description="Each bar is an alert that fired; hover for start and end.",
)
incidents_open = timeseries(
    "Open incidents by severity", [prom(f"sum by (severity) ({M.INCIDENTS_OPEN})", "{{severity}}")],
    stacked=True,
)
incidents_now = stat(
    "Open incidents", [prom(f"sum({M.INCIDENTS_OPEN})")], thresholds=[(None, "green"), (1, "red")],
)

mttr = stat(
    "MTTR", [prom(f"max({M.INCIDENT_MTTR})")], unit="s", description="Mean time to resolve incidents.",
    thresholds=[(None, "green"), (1800, "orange"), (3600, "red")],
)
mtbf = stat(
    "MTBF", [prom(f"max({M.INCIDENT_MTBF})")], unit="s", description="Mean time between incidents.",
)
recovery_ts = timeseries(
    "MTTR and MTBF over time", [prom(f"max({M.INCIDENT_MTTR})", "MTTR"), prom(f"max({M.INCIDENT_MTBF})", "MTBF")],
    unit="s",
)

notifications = timeseries(
    "Notifications sent by channel", [prom(rate("alertmanager_notifications_total", "", "integration"),
                                           "{{integration}}")],
    unit="ops",
)
notification_failures = stat(
    "Failed notifications (range)",
    [prom(increase("alertmanager_notifications_failed_total", "", "integration"), "{{integration}}")],
    thresholds=[(None, "green"), (1, "red")], text_mode="value_and_name", decimals=0,
)
notification_ratio = stat(
    "Notification failure ratio (range)",
    [prom(f'{increase("alertmanager_notifications_failed_total")} / '
          f'clamp_min({increase("alertmanager_notifications_total")}, 1)')],
    unit="percentunit", thresholds=high_bad(0.01, 0.05),
    description="Failed / attempted notifications (0 while none were attempted).",
)

dashboard = build_dashboard(
    "alerts-incidents",
    "Alerting: what fires now, every rule, the incident timeline, MTTR / MTBF and notifications.",
    [
        Section("Active Alerts", [(firing, 4, 5), (pending, 4, 5), (by_severity, 6, 5), (watchdog, 5, 5),
                                  (am_alerts, 5, 5), (active_table, 14, 8), (am_groups, 10, 8)],
                guide=("Active Alerts",)),
        Section("Alert Rules", [(rules, 12, 10), (rule_groups, 12, 5), (rule_failures, 12, 5)],
                guide=("Alert Rules",)),
        Section("Incident Timeline", [(incidents_now, 4, 8), (timeline, 12, 8), (incidents_open, 8, 8)],
                guide=("Incident Timeline",)),
        Section("MTTR/MTBF", [(mttr, 4, 6), (mtbf, 4, 6), (recovery_ts, 16, 6)], guide=("MTTR/MTBF",)),
        Section("Notifications", [(notifications, 12, 6), (notification_failures, 6, 6), (notification_ratio, 6, 6)]),
    ],
    annotations=[{
        "datasource": PROMETHEUS, "enable": True, "iconColor": "red",
        "name": "Firing alerts", "expr": f"ALERTS{{{REAL}}}", "step": "30s", "titleFormat": "{{alertname}}",
        "textFormat": "{{severity}}", "tagKeys": "alertname,severity", "useValueForTime": False,
    }],
)
