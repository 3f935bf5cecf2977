"""Metric names of the contract (docs/design.md "Metrics") and the shared HTTP metrics.

Dashboards and alert rules import the names from here, so a rename breaks the build instead of
silently emptying a panel.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# no <counter>_created / <histogram>_created series in any process: they double every counter's
# series and nothing reads them (see docs/metrics.md)
disable_created_metrics()

PREFIX = "mailgenius_"

# -- services (HTTP) -------------------------------------------------------------------------
#: counter{service, method, route, status}: HTTP requests handled, by route template and status
HTTP_REQUESTS = "mailgenius_http_requests_total"
#: histogram{service, method, route}: request handling time in seconds (buckets HTTP_BUCKETS)
HTTP_REQUEST_DURATION = "mailgenius_http_request_duration_seconds"
#: gauge{service, check}: 1 when the health check passes
HEALTH_CHECK_UP = "mailgenius_health_check_up"

# -- sender ----------------------------------------------------------------------------------
#: counter{provider}: emails accepted by the provider (an SMTP relay: accepted at DATA)
EMAILS_SENT = "mailgenius_emails_sent_total"
#: counter{provider, reason}: emails that could not be sent; reason="rejected" is a refusal at
#: submission (SMTP 5xx at RCPT/DATA, a Resend per-recipient error)
EMAIL_SEND_FAILURES = "mailgenius_email_send_failures_total"
#: counter{provider, event}: delivered, bounced, complained, delivery_delayed (provider receipts),
#: opened, clicked (our tracking pixel and redirects, every provider; the first open or click of a message)
EMAIL_EVENTS = "mailgenius_email_events_total"
#: histogram{provider, operation}: duration of one provider call (operation="send_batch" per batch)
PROVIDER_REQUEST_DURATION = "mailgenius_provider_request_duration_seconds"
#: histogram{provider}: from sent to the delivery receipt (receipt providers only)
EMAIL_DELIVERY_LATENCY = "mailgenius_email_delivery_latency_seconds"
#: counter{outcome}: campaigns finished, outcome sent or failed
CAMPAIGNS_FINISHED = "mailgenius_campaigns_finished_total"
#: counter{provider, reason}: failed provider calls (one per call, not per recipient); reason is
#: one of server_error, timeout, connection, rate_limited, client_error
PROVIDER_ERRORS = "mailgenius_provider_errors_total"
#: gauge{provider, relay}: SMTP connections a worker holds open to its relay (bounded by its pool)
SMTP_CONNECTIONS = "mailgenius_smtp_connections"
#: counter{reason}: campaigns that paused themselves (sender/guardrails.py); reason is one of
#: bounce_rate, error_rate, complaint_rate
CAMPAIGNS_AUTO_PAUSED = "mailgenius_campaigns_auto_paused_total"
#: counter{source, outcome}: bounce and complaint reports read from the bounce mailbox (DSN, ARF)
#: or the signed bounce webhook; outcome is applied, duplicate, unmatched or invalid
BOUNCE_REPORTS = "mailgenius_bounce_reports_total"

# -- importer --------------------------------------------------------------------------------
#: counter{outcome}: CSV rows processed (inserted, updated, duplicate, invalid)
IMPORT_ROWS = "mailgenius_import_rows_total"
#: counter{reason}: invalid rows, by validation reason
IMPORT_VALIDATION_ERRORS = "mailgenius_import_validation_errors_total"
#: counter{status}: import jobs finished, by final status
IMPORT_JOBS = "mailgenius_import_jobs_total"
#: histogram: duration of one import job
IMPORT_DURATION = "mailgenius_import_duration_seconds"
#: counter: bytes of CSV uploads stored
UPLOAD_BYTES = "mailgenius_upload_bytes_total"

# -- exporter (business, queues, incidents) --------------------------------------------------
#: gauge{status}: leads by status
LEADS = "mailgenius_leads"
#: gauge{status}: campaigns by status
CAMPAIGNS = "mailgenius_campaigns"
#: gauge{campaign, status}: messages of recent campaigns by status (bounded label set)
CAMPAIGN_MESSAGES = "mailgenius_campaign_messages"
#: gauge{queue, state}: messages in a dramatiq queue: waiting, delayed, dead
QUEUE_MESSAGES = "mailgenius_queue_messages"
#: gauge{queue}: age of the oldest waiting message (Redis broker; absent on RabbitMQ)
QUEUE_OLDEST_AGE = "mailgenius_queue_oldest_message_age_seconds"
#: gauge{queue}: live worker processes (heartbeats)
WORKERS = "mailgenius_workers"
#: gauge{severity}: incidents open now
INCIDENTS_OPEN = "mailgenius_incidents_open"
#: gauge: mean time to resolve incidents over the window
INCIDENT_MTTR = "mailgenius_incident_mttr_seconds"
#: gauge: mean time between incidents over the window
INCIDENT_MTBF = "mailgenius_incident_mtbf_seconds"
#: gauge{collector}: duration of the collector's last refresh
EXPORTER_COLLECT_DURATION = "mailgenius_exporter_collect_duration_seconds"
EXPORTER_SNAPSHOT_AGE = "mailgenius_exporter_snapshot_age_seconds"  #: gauge{collector}: seconds since its last refresh; -1 before the first
EXPORTER_COLLECTOR_UP = "mailgenius_exporter_collector_up"  #: gauge{collector}: 1 when its last refresh worked
EXPORTER_COLLECT_ERRORS = "mailgenius_exporter_collect_errors_total"  #: counter{collector}: failed refreshes
IMPORTS = "mailgenius_imports"  #: gauge{status}: queued/running now; completed/failed/cancelled in 24 h
IMPORT_SUCCESS_RATIO = "mailgenius_import_success_ratio"  #: gauge: completed / (completed + failed), 24 h
IMPORT_VALIDATION_ERROR_RATIO = "mailgenius_import_validation_error_ratio"  #: gauge: invalid / processed rows, 24 h

# -- scheduler (console/scheduler.py: the guide's daily and weekly tasks) -----------------------
SCHEDULED_TASK_LAST_SUCCESS = "mailgenius_scheduled_task_last_success_timestamp_seconds"  #: gauge{task}: when the task last succeeded (ScheduledTaskFailing)
SCHEDULED_TASK_LAST_RUN = "mailgenius_scheduled_task_last_run_timestamp_seconds"  #: gauge{task}: when the task last ran, whatever its outcome
SCHEDULED_TASK_LAST_RUN_SUCCESS = "mailgenius_scheduled_task_last_run_success"  #: gauge{task}: 1 ok, 0 failed
SCHEDULED_TASK_DURATION = "mailgenius_scheduled_task_duration_seconds"  #: gauge{task}: the last run
SCHEDULED_TASK_FAILURES = "mailgenius_scheduled_task_failures_total"  #: counter{task}: failed runs
SCHEDULED_TASK_NEXT_RUN = "mailgenius_scheduled_task_next_run_timestamp_seconds"  #: gauge{task}: when the schedule runs the task next
BACKUP_LAST_SUCCESS = "mailgenius_backup_last_success_timestamp_seconds"  #: gauge: when the last backup succeeded (BackupTooOld)

#: The label naming a queue on our series. dramatiq's own series (dramatiq_messages_total...)
#: call it ``queue_name``; the recording rules of alerting/rules.yml map it to ``queue`` once, and
#: a reader that must query dramatiq's raw series maps it with :func:`as_queue_label`.
QUEUE_LABEL = "queue"
DRAMATIQ_QUEUE_LABEL = "queue_name"


def as_queue_label(expr: str) -> str:
    """PromQL: ``expr`` with dramatiq's ``queue_name`` copied to our ``queue`` label."""
    return f'label_replace({expr}, "{QUEUE_LABEL}", "$1", "{DRAMATIQ_QUEUE_LABEL}", "(.*)")'


#: The dramatiq queues of the contract.
QUEUE_EMAIL = "email-sending"
QUEUE_IMPORT = "lead-import"
QUEUES = (QUEUE_EMAIL, QUEUE_IMPORT)

#: Latency buckets for HTTP handlers: fine below 100 ms (where the p99 < 25 ms target lives),
#: with 0.5 s and 1 s so the HighAPILatency threshold (p95 > 500 ms) falls on a bucket edge.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


def bare_name(name: str, suffix: str) -> str:
    """prometheus_client appends ``_total`` to counters itself; strip it from the contract name."""
    return name[: -len(suffix)] if name.endswith(suffix) else name


class HttpMetrics:
    """The HTTP metrics every aiohttp service exposes, registered on the registry passed in."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            bare_name(HTTP_REQUESTS, "_total"),
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
