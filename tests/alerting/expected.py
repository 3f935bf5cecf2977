"""The documented alert contract, written out independently of alerting/rules.yml.

docs/design.md "Alerts" (from the operations guide) plus the alerts the alerting issue adds. A
change to rules.yml that breaks the contract fails the tests instead of silently re-defining it.
"""

CRITICAL_CHANNELS = {"email", "slack", "pagerduty"}
WARNING_CHANNELS = {"email", "slack"}
#: default cooldowns by severity (rules.yml `severities`), seconds
DEFAULT_COOLDOWN = {"critical": 3600, "warning": 4 * 3600, "none": 60}

#: (alert, severity) -> (cooldown seconds, channels)
ALERTS = {
    # docs/design.md rows with an explicit cooldown and channels
    ("HighAPILatency", "warning"): (300, {"email", "slack"}),
    ("DatabaseConnectionsHigh", "critical"): (60, {"email", "slack", "pagerduty"}),
    ("EmailDeliveryRateLow", "warning"): (600, {"email"}),
    ("QueueDepthHigh", "critical"): (300, {"email", "slack"}),
    # docs/design.md rows that take the defaults by severity
    ("HighCPUUsage", "warning"): (None, None),
    ("HighMemoryUsage", "warning"): (None, None),
    ("DiskSpaceLow", "critical"): (None, None),
    ("RedisMemoryHigh", "warning"): (None, None),
    ("DatabaseCacheHitRatioLow", "warning"): (None, None),
    ("ErrorRateHigh", "warning"): (None, None),
    ("WorkerFailureRateHigh", "warning"): (None, None),
    ("BounceRateHigh", "warning"): (None, None),
    ("ImportFailureRateHigh", "warning"): (None, None),
    ("CampaignFailureRateHigh", "warning"): (None, None),
    # added by the alerting issue
    ("ServiceDown", "critical"): (None, None),
    ("WorkersDown", "critical"): (None, None),
    ("DeadLetterQueueGrowing", "warning"): (None, None),
    ("ImportStalled", "warning"): (None, None),
    ("ComplaintRateHigh", "warning"): (None, None),
    ("ProviderRateLimited", "warning"): (None, None),
    # added by the reliability issue (provider failing for several minutes)
    ("EmailProviderFailing", "critical"): (None, None),
    # added by issue 15 (campaign guard-rails)
    ("CampaignAutoPaused", "warning"): (None, None),
    # an early-warning tier (inhibited while the critical one fires)
    ("DiskSpaceLow", "warning"): (None, None),
    # meta-monitoring (packaging issue): Alertmanager failing to notify
    ("AlertmanagerNotificationsFailing", "critical"): (None, None),
    # added by the operations issue (scheduled backups and maintenance)
    ("BackupTooOld", "warning"): (None, None),
    ("ScheduledTaskFailing", "warning"): (None, None),
}

#: the SLO burn-rate alerts (issue 22, alerting/slos.yml): per SLO a page (critical) and a ticket
#: (warning) under one name, with the defaults of their severity
SLOS = ("api-availability", "api-latency", "email-delivery", "import-success")
SLO_ALERTS = {
    (name, severity): (None, None)
    for name in ("SloApiAvailabilityBudgetBurn", "SloApiLatencyBudgetBurn", "SloEmailDeliveryBudgetBurn",
                 "SloImportSuccessBudgetBurn")
    for severity in ("critical", "warning")
}

#: the Watchdog: always firing, only to the dead man's switch, never an incident
WATCHDOG = ("Watchdog", "none")


def expected(alert: str, severity: str) -> tuple[int, set[str]]:
    """(cooldown seconds, channels) the contract demands, defaults applied."""
    if (alert, severity) == WATCHDOG:
        return DEFAULT_COOLDOWN["none"], {"watchdog"}
    cooldown, channels = {**ALERTS, **SLO_ALERTS}[(alert, severity)]
    if cooldown is None:
        cooldown = DEFAULT_COOLDOWN[severity]
    if channels is None:
        channels = CRITICAL_CHANNELS if severity == "critical" else WARNING_CHANNELS
    return cooldown, set(channels)


#: Grafana dashboard uids (the dashboards engineer's contract)
DASHBOARD_UIDS = {"system-health", "import-progress", "email-metrics", "queue-health",
                  "alerts-incidents", "structured-logs", "slo"}
