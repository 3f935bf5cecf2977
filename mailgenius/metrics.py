"""Metric names of the contract (DESIGN.md "Metrics catalogue") and the shared HTTP metrics.

Dashboards and alert rules import the names from here, so a rename breaks the build instead of
silently emptying a panel.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "mailgenius_"

# -- services (HTTP) -------------------------------------------------------------------------
#: counter{service, method, route, status}
HTTP_REQUESTS = "mailgenius_http_requests_total"
#: histogram{service, method, route}
HTTP_REQUEST_DURATION = "mailgenius_http_request_duration_seconds"
#: gauge{service, check}: 1 when the health check passes
HEALTH_CHECK_UP = "mailgenius_health_check_up"

# -- sender ----------------------------------------------------------------------------------
EMAILS_SENT = "mailgenius_emails_sent_total"  #: counter{provider}
EMAIL_SEND_FAILURES = "mailgenius_email_send_failures_total"  #: counter{provider, reason}
EMAIL_EVENTS = "mailgenius_email_events_total"  #: counter{provider, event}
PROVIDER_REQUEST_DURATION = "mailgenius_provider_request_duration_seconds"  #: histogram{provider, operation}
EMAIL_DELIVERY_LATENCY = "mailgenius_email_delivery_latency_seconds"  #: histogram{provider}
CAMPAIGNS_FINISHED = "mailgenius_campaigns_finished_total"  #: counter{outcome}
#: counter{provider, reason}: failed provider calls (one per call, not per recipient); reason is
#: one of server_error, timeout, connection, rate_limited, client_error
PROVIDER_ERRORS = "mailgenius_provider_errors_total"
#: gauge{provider, relay}: SMTP connections a worker holds open to its relay (bounded by its pool)
SMTP_CONNECTIONS = "mailgenius_smtp_connections_open"
#: counter{reason}: campaigns that paused themselves (sender/guardrails.py); reason is one of
#: bounce_rate, error_rate, complaint_rate
CAMPAIGNS_AUTO_PAUSED = "mailgenius_campaigns_auto_paused_total"
#: counter{source, outcome}: bounce and complaint reports read from the bounce mailbox (DSN, ARF)
#: or the signed bounce webhook; outcome is applied, duplicate, unmatched or invalid
BOUNCE_REPORTS = "mailgenius_bounce_reports_total"

# -- importer --------------------------------------------------------------------------------
IMPORT_ROWS = "mailgenius_import_rows_total"  #: counter{outcome}
IMPORT_VALIDATION_ERRORS = "mailgenius_import_validation_errors_total"  #: counter{reason}
IMPORT_JOBS = "mailgenius_import_jobs_total"  #: counter{status}
IMPORT_DURATION = "mailgenius_import_duration_seconds"  #: histogram
UPLOAD_BYTES = "mailgenius_upload_bytes_total"  #: counter

# -- exporter (business, queues, incidents) --------------------------------------------------
LEADS = "mailgenius_leads"  #: gauge{status}
CAMPAIGNS = "mailgenius_campaigns"  #: gauge{status}
CAMPAIGN_MESSAGES = "mailgenius_campaign_messages"  #: gauge{campaign, status}
QUEUE_MESSAGES = "mailgenius_queue_messages"  #: gauge{queue, state}
QUEUE_OLDEST_AGE = "mailgenius_queue_oldest_message_age_seconds"  #: gauge{queue}
WORKERS = "mailgenius_workers"  #: gauge{queue}
INCIDENTS_OPEN = "mailgenius_incidents_open"  #: gauge{severity}
INCIDENT_MTTR = "mailgenius_incident_mttr_seconds"  #: gauge
INCIDENT_MTBF = "mailgenius_incident_mtbf_seconds"  #: gauge
EXPORTER_COLLECT_DURATION = "mailgenius_exporter_collect_duration_seconds"  #: gauge{collector}
EXPORTER_SNAPSHOT_AGE = "mailgenius_exporter_snapshot_age_seconds"  #: gauge{collector}; -1 before the first
EXPORTER_COLLECTOR_UP = "mailgenius_exporter_collector_up"  #: gauge{collector}: 1 when its last refresh worked
EXPORTER_COLLECT_ERRORS = "mailgenius_exporter_collect_errors_total"  #: counter{collector}
IMPORTS = "mailgenius_imports"  #: gauge{status}: queued/running now; completed/failed/cancelled in 24 h
IMPORT_SUCCESS_RATIO = "mailgenius_import_success_ratio"  #: gauge: completed / (completed + failed), 24 h
IMPORT_VALIDATION_ERROR_RATIO = "mailgenius_import_validation_error_ratio"  #: gauge: invalid / processed rows, 24 h

#: The dramatiq queues of the contract.
QUEUE_EMAIL = "email-sending"
QUEUE_IMPORT = "lead-import"
QUEUES = (QUEUE_EMAIL, QUEUE_IMPORT)

#: Latency buckets for HTTP handlers: fine below 100 ms (where the p99 < 25 ms target lives),
#: with 0.5 s and 1 s so the HighAPILatency threshold (p95 > 500 ms) falls on a bucket edge.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


def _bare(name: str, suffix: str) -> str:
    """prometheus_client appends ``_total`` to counters itself; strip it from the contract name."""
    return name[: -len(suffix)] if name.endswith(suffix) else name


class HttpMetrics:
    """The HTTP metrics every aiohttp service exposes, registered on the registry passed in."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            _bare(HTTP_REQUESTS, "_total"),
            "HTTP requests handled, by route template and status.",
            ["service", "method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            HTTP_REQUEST_DURATION,
            "HTTP request handling time, by route template.",
            ["service", "method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.health_up = Gauge(
            HEALTH_CHECK_UP,
            "1 when the named health check last passed, else 0.",
            ["service", "check"],
            registry=registry,
        )
