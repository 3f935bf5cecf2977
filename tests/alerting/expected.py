"""The documented alert contract, written out independently of alerting/rules.yml.

DESIGN.md "Alerts" (from the operations guide) plus the alerts the alerting issue adds. A
change to rules.yml that breaks the contract fails the tests instead of silently re-defining it.
"""

CRITICAL_CHANNELS = {"email", "slack", "pagerduty"}
WARNING_CHANNELS = {"email", "slack"}
#: default cooldowns by severity (rules.yml `severities`), seconds
DEFAULT_COOLDOWN = {"critical": 3600, "warning": 4 * 3600, "none": 60}

#: (alert, severity) -> (cooldown seconds, channels)
ALERTS = {
    # DESIGN.md rows with an explicit cooldown and channels
    ("HighAPILatency", "warning"): (300, {"email", "slack"}),
    ("DatabaseConnectionsHigh", "critical"): (60, {"email", "slack", "pagerduty"}),
    ("EmailDeliveryRateLow", "warning"): (600, {"email"}),
    ("QueueDepthHigh", "critical"): (300, {"email", "slack"}),
    # DESIGN.md rows that take the defaults by severity
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
}

#: the Watchdog: always firing, only to the dead man's switch, never an incident
WATCHDOG = ("Watchdog", "none")


def expected(alert: str, severity: str) -> tuple[int, set[str]]:
    """(cooldown seconds, channels) the contract demands, defaults applied."""
    if (alert, severity) == WATCHDOG:
        return DEFAULT_COOLDOWN["none"], {"watchdog"}
    cooldown, channels = ALERTS[(alert, severity)]
    if cooldown is None:
        cooldown = DEFAULT_COOLDOWN[severity]
    if channels is None:
        channels = CRITICAL_CHANNELS if severity == "critical" else WARNING_CHANNELS
    return cooldown, set(channels)


#: Grafana dashboard uids (the dashboards engineer's contract)
DASHBOARD_UIDS = {"system-health", "import-progress", "email-metrics", "queue-health",
                  "alerts-incidents", "structured-logs"}
