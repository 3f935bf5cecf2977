"""Exporter-only settings, read from the environment (or ``Settings.extra`` in tests) so the
kernel's Settings need not grow for them.

| variable | default | why change it |
|---|---|---|
| ``MAILGENIUS_EXPORTER_REFRESH_SECONDS`` | 5 | seconds between background snapshot refreshes; lower for fresher gauges at more DB load |
| ``MAILGENIUS_EXPORTER_MAX_SNAPSHOT_AGE`` | 60 | a snapshot older than this is no longer exported (its age still is): stale data must not look live |
| ``MAILGENIUS_EXPORTER_CAMPAIGN_LIMIT`` | 20 | how many recent or active campaigns get ``mailgenius_campaign_messages`` series (bounds cardinality) |
| ``MAILGENIUS_EXPORTER_WORKER_STALE_SECONDS`` | 10 | a worker whose last heartbeat is older is counted gone |
| ``MAILGENIUS_EXPORTER_RATE_WINDOW_HOURS`` | 24 | window of the import success / validation-error ratios and of MTTR / MTBF (x 30) |
| ``MAILGENIUS_ALERT_WEBHOOK_TOKEN`` | none | when set, ``/api/alerts/webhook`` requires ``Authorization: Bearer <token>`` (Alertmanager's ``http_config.authorization``) |
| ``MAILGENIUS_ALERT_IGNORED`` | ``Watchdog`` | comma-separated alert names that never become incidents (the always-firing Watchdog) |
| ``MAILGENIUS_EXPORTER_HEALTH_SECONDS`` | 15 | seconds between background runs of the aggregated health checks, which keep ``mailgenius_health_check_up{service="exporter"}`` current for Prometheus |
| ``MAILGENIUS_SLOW_QUERY_SECONDS`` | 1 | an active Postgres query running longer counts as slow in the operator summary |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from mailgenius.settings import Settings, SettingsError


@dataclass(frozen=True)
class ExporterConfig:
    refresh_seconds: float = 5.0
    max_snapshot_age: float = 60.0
    campaign_limit: int = 20
    worker_stale_seconds: float = 10.0
    rate_window_hours: float = 24.0
    #: MTTR / MTBF look at incidents started within this many days
    incident_window_days: float = 30.0
    webhook_token: str = ""
    ignored_alerts: tuple[str, ...] = ("Watchdog",)
    slow_query_seconds: float = 1.0
    #: seconds to wait for another service's health, Prometheus or Alertmanager
    http_timeout: float = 2.0
    health_seconds: float = 15.0


def _num(env: Mapping[str, str], name: str, default: float, cast=float, lo: float = 0.0):
    raw = env.get(name)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = cast(str(raw).strip())
    except ValueError:
        raise SettingsError(name, f"expected a number, got {raw!r}") from None
    if value <= lo:
        raise SettingsError(name, f"must be > {lo:g}, got {value}")
    return value


def load_config(settings: Settings, environ: Mapping[str, str] | None = None) -> ExporterConfig:
    """Environment first, then ``settings.extra`` (tests put overrides there)."""
    env = dict(os.environ if environ is None else environ)
    env.update({k: str(v) for k, v in (settings.extra or {}).items()})
    ignored = env.get("MAILGENIUS_ALERT_IGNORED")
    return ExporterConfig(
        refresh_seconds=_num(env, "MAILGENIUS_EXPORTER_REFRESH_SECONDS", 5.0),
        max_snapshot_age=_num(env, "MAILGENIUS_EXPORTER_MAX_SNAPSHOT_AGE", 60.0),
        campaign_limit=_num(env, "MAILGENIUS_EXPORTER_CAMPAIGN_LIMIT", 20, int),
        worker_stale_seconds=_num(env, "MAILGENIUS_EXPORTER_WORKER_STALE_SECONDS", 10.0),
        rate_window_hours=_num(env, "MAILGENIUS_EXPORTER_RATE_WINDOW_HOURS", 24.0),
        incident_window_days=_num(env, "MAILGENIUS_EXPORTER_INCIDENT_WINDOW_DAYS", 30.0),
        webhook_token=env.get("MAILGENIUS_ALERT_WEBHOOK_TOKEN", "") or "",
        ignored_alerts=tuple(a.strip() for a in ignored.split(",") if a.strip())
        if ignored is not None else ("Watchdog",),
        slow_query_seconds=_num(env, "MAILGENIUS_SLOW_QUERY_SECONDS", 1.0),
        http_timeout=_num(env, "MAILGENIUS_EXPORTER_HTTP_TIMEOUT", 2.0),
        health_seconds=_num(env, "MAILGENIUS_EXPORTER_HEALTH_SECONDS", 15.0),
    )
