"""4. Queue Health: depth, processing rate, worker status, job statistics and error tracking of
the dramatiq queues (email-sending, lead-import)."""

from dashboards.helpers import (
    UP_DOWN,
    WORKER_JOBS,
    Section,
    alerts_annotation,
    build_dashboard,
    fires,
    high_bad,
    increase,
    panel_link,
    per_queue,
    prom,
    queue_var,
    rate,
    ratio,
    stat,
    table,
    threshold,
    timeseries,
    zero_fill,
)
from mailgenius import metrics as M

Q = 'queue=~"$queue"'
#: dramatiq labels messages with queue_name; its delay queue is "<queue>.DQ", dead letters ".XQ";
#: panels show our `queue` label (helpers.per_queue, the mapping of mailgenius.metrics)
DQ = 'queue_name=~"($queue)(\\\\.[DX]Q)?"'
WORKER_SEL = 'job=~"{}"'.format("|".join(WORKER_JOBS))

waiting = stat(
    "Waiting messages", [prom(f'sum by (queue) ({M.QUEUE_MESSAGES}{{{Q},state="waiting"}})', "{{queue}}")],
    thresholds=[(None, "green"), (threshold("queue_waiting_messages") / 2, "orange"),
                (threshold("queue_waiting_messages"), "red")], text_mode="value_and_name",
    description=fires("QueueDepthHigh", "above", "queue_waiting_messages", "num", "waiting messages"),
)
depth = timeseries(
    "Queue depth by state", [prom(f"sum by (queue, state) ({M.QUEUE_MESSAGES}{{{Q}}})", "{{queue}} {{state}}")],
    thresholds=[(None, "green"), (threshold("queue_waiting_messages"), "red")],
)
oldest = timeseries(
    "Oldest waiting message age", [prom(f"max by (queue) ({M.QUEUE_OLDEST_AGE}{{{Q}}})", "{{queue}}")],
    unit="s",
)
dead = stat(
    "Dead-lettered", [prom(f'sum by (queue) ({M.QUEUE_MESSAGES}{{{Q},state="dead"}})', "{{queue}}")],
    thresholds=[(None, "green"), (1, "orange")], text_mode="value_and_name",
    description="Messages that exhausted their retries; retry or clear them with POST /api/queue/admin.",
)

processed = timeseries(
    "Messages processed per second", [prom(per_queue(rate("dramatiq_messages_total", DQ, "queue_name")), "{{queue}}")],
    unit="ops",
)
processed_now = stat(
    "Processed/s now", [prom(rate("dramatiq_messages_total", DQ, "", "1m"))], decimals=1, graph=True,
)
duration = timeseries(
    "Message processing time p50 / p95",
    [prom("histogram_quantile(0.5, " + per_queue(f"rate(dramatiq_message_duration_milliseconds_bucket{{{DQ}}}"
                                                 "[$__rate_interval])", "le") + ") / 1000", "{{queue}} p50"),
     prom("histogram_quantile(0.95, " + per_queue(f"rate(dramatiq_message_duration_milliseconds_bucket{{{DQ}}}"
                                                  "[$__rate_interval])", "le") + ") / 1000", "{{queue}} p95")],
    unit="s",
)

workers = stat(
    "Workers by queue", [prom(f"sum by (queue) ({M.WORKERS}{{{Q}}})", "{{queue}}")],
    thresholds=[(None, "red"), (1, "green")], text_mode="value_and_name",
    description="Worker processes heartbeating per queue (0 = nobody consumes it).",
)
worker_up = stat(
    "Worker metrics endpoints", [prom(f"up{{{WORKER_SEL}}}", "{{service}}")], mappings=UP_DOWN,
    thresholds=[(None, "red"), (1, "green")], text_mode="value_and_name",
)
in_progress = timeseries(
    "Messages in progress", [prom(per_queue(f"dramatiq_messages_inprogress{{{DQ}}}"), "{{queue}}")],
)
workers_ts = timeseries(
    "Workers over time", [prom(f"sum by (queue) ({M.WORKERS}{{{Q}}})", "{{queue}}")],
)

jobs_table = table(
    "Job statistics by actor (range)",
    [prom(per_queue(increase("dramatiq_messages_total", DQ, "queue_name, actor_name"), "actor_name"),
          instant=True, fmt="table"),
     prom(zero_fill(per_queue(increase("dramatiq_message_errors_total", DQ, "queue_name, actor_name"), "actor_name"),
                    per_queue(increase("dramatiq_messages_total", DQ, "queue_name, actor_name"), "actor_name")),
          instant=True, fmt="table"),
     prom(zero_fill(per_queue(increase("dramatiq_message_retries_total", DQ, "queue_name, actor_name"), "actor_name"),
                    per_queue(increase("dramatiq_messages_total", DQ, "queue_name, actor_name"), "actor_name")),
          instant=True, fmt="table")],
    description="Value #A: processed; #B: errored; #C: retried.",
)
completed = stat(
    "Processed (range)", [prom(per_queue(increase("dramatiq_messages_total", DQ, "queue_name")), "{{queue}}")],
    decimals=0, text_mode="value_and_name",
)
retries = timeseries(
    "Retries and dead letters per second",
    [prom(zero_fill(per_queue(rate("dramatiq_message_retries_total", DQ, "queue_name")),
                    per_queue(rate("dramatiq_messages_total", DQ, "queue_name"))), "{{queue}} retried"),
     prom(zero_fill(per_queue(rate("dramatiq_message_rejects_total", DQ, "queue_name")),
                    per_queue(rate("dramatiq_messages_total", DQ, "queue_name"))), "{{queue}} dead-lettered")],
    unit="ops",
)

failure_ratio = timeseries(
    "Job failure ratio",
    [prom(ratio(per_queue(rate("dramatiq_message_errors_total", DQ, "queue_name", "5m")),
                per_queue(rate("dramatiq_messages_total", DQ, "queue_name", "5m"))), "{{queue}}")],
    unit="percentunit", thresholds=[(None, "green"), (threshold("worker_error_ratio"), "red")],
    description=fires("WorkerFailureRateHigh", "above", "worker_error_ratio"),
)
failure_stat = stat(
    "Job failure rate (range)",
    [prom(ratio(increase("dramatiq_message_errors_total", DQ), increase("dramatiq_messages_total", DQ)))],
    unit="percentunit", thresholds=high_bad(threshold("worker_error_ratio") * 0.4, threshold("worker_error_ratio")),
    links=[panel_link("structured-logs")],
)
errors = timeseries(
    "Errors per second by actor",
    [prom(zero_fill(per_queue(rate("dramatiq_message_errors_total", DQ, "queue_name, actor_name"), "actor_name"),
                    per_queue(rate("dramatiq_messages_total", DQ, "queue_name, actor_name"), "actor_name")),
          "{{actor_name}}")],
    unit="ops", bars=True, links=[panel_link("structured-logs")],
)

dashboard = build_dashboard(
    "queue-health",
    "dramatiq queues: depth, processing rate, workers, job statistics and errors.",
    [
        Section("Queue Depth", [(waiting, 6, 7), (dead, 6, 7), (depth, 12, 7), (oldest, 24, 6)],
                guide=("Queue Depth",)),
        Section("Processing Rate", [(processed_now, 4, 7), (processed, 10, 7), (duration, 10, 7)],
                guide=("Processing Rate",)),
        Section("Worker Status", [(workers, 6, 6), (worker_up, 6, 6), (in_progress, 6, 6), (workers_ts, 6, 6)],
                guide=("Worker Status",)),
        Section("Job Statistics", [(completed, 6, 8), (jobs_table, 10, 8), (retries, 8, 8)],
                guide=("Job Statistics",)),
        Section("Error Tracking", [(failure_stat, 6, 7), (failure_ratio, 9, 7), (errors, 9, 7)],
                guide=("Error Tracking",)),
    ],
    variables=[queue_var()],
    annotations=[alerts_annotation()],
)
