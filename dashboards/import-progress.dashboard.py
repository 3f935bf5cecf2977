"""2. Import Progress: active jobs, the lead-import queue, rows per second, error rate and CSV
validation errors by reason."""

from dashboards.helpers import (
    Section,
    alerts_annotation,
    bargauge,
    build_dashboard,
    fires,
    high_bad,
    increase,
    low_bad,
    mean_of,
    panel_link,
    prom,
    quantile,
    rate,
    ratio,
    stat,
    threshold,
    timeseries,
)
from mailgenius import metrics as M

QUEUE = M.QUEUE_IMPORT
DQ = f'queue_name=~"{QUEUE}(\\\\.[DX]Q)?"'  # dramatiq's delay queue shares the name with a suffix
IMPORTER = 'service="importer"'

active = stat(
    "Active import jobs", [prom(f'sum by (status) ({M.IMPORTS}{{status=~"queued|running"}})', "{{status}}")],
    description="Imports queued or running now (the exporter's view of the imports table).",
    text_mode="value_and_name", decimals=0,
)
jobs_range = stat(
    "Import jobs (range)", [prom(increase(M.IMPORT_JOBS, "", "status"), "{{status}}")],
    description="Finished import jobs over the selected range, by final status.",
    text_mode="value_and_name", decimals=0,
)
active_ts = timeseries(
    "Import jobs in progress and finishing",
    [prom(f'sum({M.IMPORTS}{{status=~"queued|running"}})', "queued + running"),
     prom(f"sum(dramatiq_messages_inprogress{{{DQ}}})", "being processed by a worker"),
     prom(rate(M.IMPORT_JOBS, "", "status", "5m") + " * 60", "finished {{status}} / min")],
)

queue_state = timeseries(
    "Lead-import queue", [prom(f'sum by (state) ({M.QUEUE_MESSAGES}{{queue="{QUEUE}"}})', "{{state}}")],
    description="Waiting, delayed and dead-lettered import messages.",
)
queue_age = stat(
    "Oldest waiting import", [prom(f'max({M.QUEUE_OLDEST_AGE}{{queue="{QUEUE}"}})')], unit="s",
    thresholds=[(None, "green"), (300, "orange"), (900, "red")],
)
workers = stat(
    "Import workers", [prom(f'sum({M.WORKERS}{{queue="{QUEUE}"}})')],
    thresholds=[(None, "red"), (1, "green")], description="Worker processes heartbeating on lead-import.",
    links=[panel_link("queue-health")],
)

rows_rate = timeseries(
    "Rows processed per second", [prom(rate(M.IMPORT_ROWS, "", "outcome"), "{{outcome}}")],
    stacked=True,
    description="Inserted, updated, duplicate and invalid rows per second (records/segundo).",
)
rows_now = stat(
    "Rows per second now", [prom(rate(M.IMPORT_ROWS, "", "", "1m"))], graph=True, decimals=0,
)
rows_range = stat(
    "Rows (range)", [prom(increase(M.IMPORT_ROWS, "", "outcome"), "{{outcome}}")],
    text_mode="value_and_name", decimals=0,
)
upload = timeseries(
    "Upload throughput", [prom(rate(M.UPLOAD_BYTES), "uploaded")], unit="Bps",
)
duration = timeseries(
    "Import duration p50 / p95",
    [prom(quantile(0.5, M.IMPORT_DURATION, "", "", "$__range"), "p50"),
     prom(quantile(0.95, M.IMPORT_DURATION, "", "", "$__range"), "p95"),
     prom(mean_of(M.IMPORT_DURATION, "", "", "$__range"), "mean")],
    unit="s",
)

invalid_ratio = timeseries(
    "Invalid row ratio",
    [prom(ratio(rate(M.IMPORT_ROWS, 'outcome="invalid"', "", "5m"), rate(M.IMPORT_ROWS, "", "", "5m")),
          "invalid / all rows")],
    unit="percentunit", thresholds=high_bad(0.02, 0.05),
)
success_ratio = stat(
    "Import success rate (24 h)", [prom(f"max({M.IMPORT_SUCCESS_RATIO})")], unit="percentunit", decimals=1,
    thresholds=low_bad(0.98, 0.95), description="Completed / (completed + failed) imports over 24 h.",
)
validation_ratio = stat(
    "Validation error rate (24 h)", [prom(f"max({M.IMPORT_VALIDATION_ERROR_RATIO})")], unit="percentunit",
    decimals=2, thresholds=high_bad(0.02, 0.05), description="Invalid / processed rows over 24 h.",
)
job_failure = stat(
    "Import job failure rate (range)",
    [prom(ratio(increase(M.IMPORT_JOBS, 'status="failed"'), increase(M.IMPORT_JOBS)))],
    unit="percentunit", thresholds=high_bad(threshold("import_failure_ratio") * 0.4, threshold("import_failure_ratio")),
    description=fires("ImportFailureRateHigh", "above", "import_failure_ratio"),
)
upload_errors = timeseries(
    "Upload API errors",
    [prom(rate(M.HTTP_REQUESTS, IMPORTER + ',status=~"4..|5.."', "status, route"), "{{status}} {{route}}")],
    unit="reqps", description="Rejected uploads (413 too large, 400 bad file) and server errors.",
)

validation = bargauge(
    "Validation errors by reason (range)",
    [prom(f"sort_desc({increase(M.IMPORT_VALIDATION_ERRORS, '', 'reason')})", "{{reason}}", instant=True)],
)
validation_ts = timeseries(
    "Validation errors per second", [prom(rate(M.IMPORT_VALIDATION_ERRORS, "", "reason"), "{{reason}}")],
    stacked=True,
)
leads = timeseries(
    "Leads by status", [prom(f"sum by (status) ({M.LEADS})", "{{status}}")],
)

dashboard = build_dashboard(
    "import-progress",
    "Lead imports: jobs in flight, the lead-import queue, rows per second, failure and "
    "validation-error rates.",
    [
        Section("Active Jobs", [(active, 6, 6), (jobs_range, 6, 6), (active_ts, 12, 6)], guide=("Active Jobs",)),
        Section("Queue Status", [(queue_state, 12, 6), (queue_age, 6, 6), (workers, 6, 6)],
                guide=("Queue Status",)),
        Section("Processing Rate", [(rows_now, 4, 7), (rows_rate, 12, 7), (rows_range, 8, 7),
                                    (upload, 12, 6), (duration, 12, 6)], guide=("Processing Rate",)),
        Section("Error Rate", [(success_ratio, 4, 6), (job_failure, 4, 6), (invalid_ratio, 8, 6),
                               (upload_errors, 8, 6)],
                guide=("Error Rate",)),
        Section("CSV Validation", [(validation_ratio, 4, 8), (validation, 8, 8), (validation_ts, 6, 8),
                                   (leads, 6, 8)],
                guide=("CSV Validation",)),
    ],
    annotations=[alerts_annotation()],
)
