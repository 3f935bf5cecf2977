"""1. System Health Overview: overall status, monitored services, uptime, response times,
dependencies (Postgres, Redis, host) and capacity planning."""

from dashboards.helpers import (
    API_SELECTOR,
    FS_SELECTOR,
    UP_DOWN,
    Section,
    alerts_annotation,
    build_dashboard,
    fires,
    gauge,
    high_bad,
    low_bad,
    mean_of,
    prom,
    quantile,
    rate,
    ratio,
    recorded,
    service_var,
    stat,
    status_mapping,
    table,
    threshold,
    timeseries,
)
from mailgenius import metrics as M

SEL = 'service=~"$service"'
#: the scrape of /metrics itself is not API traffic (the alert rules exclude it too)
HTTP_SEL = 'service=~"$service",' + API_SELECTOR

overall = stat(
    "Overall status",
    [prom(f"min(up{{{SEL}}}) * (1 + min({M.HEALTH_CHECK_UP}))")],
    description="2 = Healthy (every target up and every health check passing), 1 = Degraded "
                "(targets up, a health check failing), 0 = Unhealthy (a scraped target is down).",
    mappings=status_mapping({2: ("Healthy", "green"), 1: ("Degraded", "orange"), 0: ("Unhealthy", "red")}),
    thresholds=[(None, "red"), (1, "orange"), (2, "green")],
)
checks_passing = stat(
    "Health checks passing",
    [prom(f"avg({M.HEALTH_CHECK_UP})")], unit="percentunit",
    description="Share of the services' health checks (database, redis, queue, email, upload, "
                "workers) that last passed.",
    thresholds=low_bad(1, 0.75),
)
targets_up = stat(
    "Targets up", [prom(f"sum(up{{{SEL}}})"), prom(f"count(up{{{SEL}}})")],
    description="Scrape targets answering / configured.", text_mode="value_and_name",
)

services = stat(
    "Service status", [prom(f"up{{{SEL}}}", "{{service}}")],
    description="Prometheus' `up` for every scraped target: API services, workers, exporters.",
    mappings=UP_DOWN, thresholds=[(None, "red"), (1, "green")], text_mode="value_and_name",
)
dependency_checks = table(
    "Health checks by service", [prom(f"{M.HEALTH_CHECK_UP}", instant=True, fmt="table")],
    description="Each service's own checks as `/api/health/<check>` reports them (1 = passing).",
    hide=("Time", "__name__", "instance"),
    mappings=status_mapping({1: ("passing", "green"), 0: ("failing", "red")}),
)
dependency_up = stat(
    "Dependencies", [
        prom("pg_up", "PostgreSQL"), prom("redis_up", "Redis"),
        prom("min(up{job=~\"sender-worker|importer-worker\"})", "Workers"),
        prom("min(up{job=\"node\"})", "Host"),
    ],
    description="Database, Redis, worker metrics endpoints and the host exporter.",
    mappings=UP_DOWN, thresholds=[(None, "red"), (1, "green")], text_mode="value_and_name",
)

collectors = stat(
    "Exporter collectors", [prom(f"min by (collector) ({M.EXPORTER_COLLECTOR_UP})", "{{collector}}")],
    mappings=status_mapping({1: ("OK", "green"), 0: ("FAILING", "red")}), thresholds=[(None, "red"), (1, "green")],
    text_mode="value_and_name",
    description="The exporter's business collectors (leads, campaigns, queues, workers, incidents, imports); "
                "a failing one keeps its last snapshot while its age grows.",
)

availability = stat(
    "Availability (range)", [prom(f"avg_over_time(up{{{SEL}}}[$__range])", "{{service}}")],
    unit="percentunit", decimals=2, thresholds=low_bad(0.999, 0.99), text_mode="value_and_name",
    description="Share of scrapes that succeeded over the selected range.",
)
uptime = stat(
    "Uptime since start",
    [prom(f"time() - max by (service) (process_start_time_seconds{{{SEL}}})", "{{service}}")],
    unit="s", description="Time since each process last started (a restart resets it).",
    text_mode="value_and_name",
)
up_history = timeseries(
    "Targets up over time", [prom(f"sum by (service) (up{{{SEL}}})", "{{service}}")],
    description="Drops show outages and restarts.",
)

latency = timeseries(
    "API latency p50 / p95 / p99",
    [prom(quantile(0.5, M.HTTP_REQUEST_DURATION, HTTP_SEL), "p50"),
     prom(quantile(0.95, M.HTTP_REQUEST_DURATION, HTTP_SEL), "p95"),
     prom(quantile(0.99, M.HTTP_REQUEST_DURATION, HTTP_SEL), "p99")],
    unit="s", thresholds=[(None, "green"), (threshold("api_latency_p95_seconds"), "red")],
    description=fires("HighAPILatency", "when p95 stays above", "api_latency_p95_seconds", "ms"),
)
latency_by_service = timeseries(
    "Mean response time by service",
    [prom(mean_of(M.HTTP_REQUEST_DURATION, HTTP_SEL, "service"), "{{service}}")], unit="s",
)
p95_stat = stat(
    # the series HighAPILatency reads (per service, 5 min): the worst of the selected services
    "API p95 now (worst service)", [prom("max(" + recorded("api_latency_p95", 'service=~"$service"') + ")")], unit="s",
    description=fires("HighAPILatency", "when a service's p95 stays above", "api_latency_p95_seconds", "ms"),
    thresholds=[(None, "green"), (threshold("api_latency_p95_seconds") * 0.7, "orange"),
                (threshold("api_latency_p95_seconds"), "red")], graph=True,
)
request_rate = timeseries(
    "Request rate by service", [prom(rate(M.HTTP_REQUESTS, HTTP_SEL, "service"), "{{service}}")],
    unit="reqps",
)
error_rate = timeseries(
    "5xx error ratio by service",
    [prom(ratio(rate(M.HTTP_REQUESTS, HTTP_SEL + ',status=~"5.."', "service"),
                rate(M.HTTP_REQUESTS, HTTP_SEL, "service")), "{{service}}")],
    unit="percentunit", thresholds=[(None, "green"), (threshold("http_error_ratio"), "red")],
    description=fires("ErrorRateHigh", "above", "http_error_ratio"),
)
slow_routes = table(
    "Slowest routes (p95)",
    [prom(f"topk(10, {quantile(0.95, M.HTTP_REQUEST_DURATION, HTTP_SEL, 'service, method, route', '$__range')})",
          instant=True, fmt="table")],
    unit="s", hide=("Time",),
)

db_connections = timeseries(
    "Database connections (share of max_connections)",
    [prom(recorded("pg_connections_ratio"), "{{service}}")],
    unit="percentunit",
    thresholds=[(None, "green"), (threshold("postgres_connections_ratio"), "red")],
    description=fires("DatabaseConnectionsHigh", "above", "postgres_connections_ratio", "pct", "of max_connections"),
)
db_cache = gauge(
    "Database cache hit ratio",
    [prom(f"min({recorded('pg_cache_hit_ratio')})")],
    thresholds=low_bad(min(1.0, threshold("postgres_cache_hit_ratio") + 0.05), threshold("postgres_cache_hit_ratio")),
    description=fires("DatabaseCacheHitRatioLow", "below", "postgres_cache_hit_ratio"),
)
db_tx = timeseries(
    "Database transactions",
    [prom("sum(rate(pg_stat_database_xact_commit[$__rate_interval]))", "commits"),
     prom("sum(rate(pg_stat_database_xact_rollback[$__rate_interval]))", "rollbacks")],
    unit="ops",
)
redis_memory = gauge(
    "Redis memory used",
    [prom(f"max({recorded('redis_memory')})")],
    thresholds=high_bad(threshold("redis_memory_ratio") * 0.8, threshold("redis_memory_ratio")),
    description="Of `maxmemory` when set, else of the host's memory. "
                + fires("RedisMemoryHigh", "above", "redis_memory_ratio"),
)
redis_clients = timeseries(
    "Redis clients and commands",
    [prom("sum(redis_connected_clients)", "clients"),
     prom("sum(rate(redis_commands_processed_total[$__rate_interval]))", "commands/s")],
)
cpu = gauge(
    "CPU", [prom(f"max({recorded('cpu_utilisation')})")],
    thresholds=high_bad(threshold("cpu_utilisation_ratio") - 0.1, threshold("cpu_utilisation_ratio")),
    description="Busiest host, over 5 minutes. " + fires("HighCPUUsage", "above", "cpu_utilisation_ratio"),
)
memory = gauge(
    "Memory", [prom(f"max({recorded('memory_utilisation')})")],
    thresholds=high_bad(threshold("memory_utilisation_ratio") - 0.1, threshold("memory_utilisation_ratio")),
    description=fires("HighMemoryUsage", "above", "memory_utilisation_ratio"),
)
disk = gauge(
    "Disk (fullest filesystem)",
    [prom(f"max({recorded('disk_usage')})")],
    thresholds=high_bad(threshold("disk_usage_warning_ratio"), threshold("disk_usage_critical_ratio")),
    description=fires("DiskSpaceLow", "above", "disk_usage_critical_ratio"),
)
resources = timeseries(
    "Host resources",
    [prom('1 - avg(rate(node_cpu_seconds_total{mode="idle"}[$__rate_interval]))', "CPU"),
     prom("1 - sum(node_memory_MemAvailable_bytes) / sum(node_memory_MemTotal_bytes)", "memory"),
     prom(f"max({recorded('disk_usage')})", "disk")],
    unit="percentunit",
)

disk_forecast = timeseries(
    "Disk free: now and forecast in 7 days",
    [prom(f"min(node_filesystem_avail_bytes{{{FS_SELECTOR}}})", "free now"),
     prom(f"min(predict_linear(node_filesystem_avail_bytes{{{FS_SELECTOR}}}[6h], 7 * 86400))",
          "forecast +7d")],
    unit="bytes", min_zero=False,
    description="Linear fit over the last 6 h; a forecast under zero means the disk fills within a week.",
)
leads_forecast = timeseries(
    "Leads: now and forecast in 30 days",
    [prom(f"sum({M.LEADS})", "leads now"),
     prom(f"sum(predict_linear({M.LEADS}[6h], 30 * 86400))", "forecast +30d")],
    description="Lead growth projected from the last 6 h (operations guide: lead growth projections).",
)
db_size_forecast = timeseries(
    "Database size: now and forecast in 30 days",
    [prom("sum(pg_database_size_bytes)", "size now"),
     prom("sum(predict_linear(pg_database_size_bytes[6h], 30 * 86400))", "forecast +30d")],
    unit="bytes",
)
queue_forecast = timeseries(
    "Queue backlog forecast in 1 hour",
    [prom(f'sum by (queue) ({M.QUEUE_MESSAGES}{{state="waiting"}})', "{{queue}} now"),
     prom(f'sum by (queue) (predict_linear({M.QUEUE_MESSAGES}{{state="waiting"}}[1h], 3600))',
          "{{queue}} +1h")],
    thresholds=[(None, "green"), (threshold("queue_waiting_messages"), "red")], min_zero=False,
    description=fires("QueueDepthHigh", "above", "queue_waiting_messages", "num", "waiting messages"),
)

backup_age = stat(
    "Last good backup",
    [prom(f"time() - max({M.BACKUP_LAST_SUCCESS})")], unit="s",
    description="Age of the scheduler's last successful backup; BackupTooOld fires above 26 h.",
    thresholds=high_bad(25 * 3600, 26 * 3600),
)
task_status = table(
    "Scheduled tasks: last run",
    [prom(f"max by (task) ({M.SCHEDULED_TASK_LAST_RUN_SUCCESS})", instant=True, fmt="table")],
    description="1 = the task's last run succeeded, 0 = it failed (ScheduledTaskFailing).",
    hide=("Time",),
    mappings=status_mapping({1: ("succeeded", "green"), 0: ("failed", "red")}),
)
task_duration = timeseries(
    "Scheduled task duration",
    [prom(f"max by (task) ({M.SCHEDULED_TASK_DURATION})", "{{task}}")], unit="s",
    description="How long each task's last run took (backup, clean-up, reports, maintenance).",
)
task_failures = timeseries(
    "Scheduled task failures",
    [prom(f"sum by (task) (increase({M.SCHEDULED_TASK_FAILURES}[1h]))", "{{task}}")], bars=True,
    description="Failed runs per task over the last hour.",
)

dashboard = build_dashboard(
    "system-health",
    "Is MailGenius up? Overall status, every service and dependency, response times, host "
    "resources and capacity forecasts.",
    [
        Section("Status Geral — overall status", [(overall, 8, 5), (checks_passing, 8, 5), (targets_up, 8, 5)],
                guide=("Status Geral",)),
        Section("Serviços Monitorados — services and dependencies",
                [(services, 24, 5), (dependency_up, 8, 8), (dependency_checks, 10, 8), (collectors, 6, 8)],
                guide=("Serviços Monitorados",)),
        Section("Uptime", [(availability, 8, 6), (uptime, 8, 6), (up_history, 8, 6)], guide=("Uptime",)),
        Section("Response Times", [(p95_stat, 4, 8), (latency, 10, 8), (latency_by_service, 10, 8),
                                   (request_rate, 8, 8), (error_rate, 8, 8), (slow_routes, 8, 8)],
                guide=("Response Times",)),
        Section("Database and Redis", [(db_connections, 8, 7), (db_cache, 4, 7), (db_tx, 6, 7),
                                       (redis_memory, 6, 7), (redis_clients, 24, 6)]),
        Section("Host resources", [(cpu, 4, 7), (memory, 4, 7), (disk, 4, 7), (resources, 12, 7)]),
        Section("Capacity Planning", [(disk_forecast, 12, 7), (db_size_forecast, 12, 7),
                                      (leads_forecast, 12, 7), (queue_forecast, 12, 7)]),
        Section("Scheduled maintenance", [(backup_age, 4, 7), (task_status, 6, 7), (task_duration, 7, 7),
                                          (task_failures, 7, 7)]),
    ],
    variables=[service_var()],
    annotations=[alerts_annotation()],
)
