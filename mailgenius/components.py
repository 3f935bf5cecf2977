"""The processes of the stack and their ports: one table for ``make run`` (console), compose and
Kubernetes (deploy), and the worker groups ``mailgenius worker`` starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    """One process of ``make run`` that listens on a port."""

    name: str  #: Procfile process name
    env: str  #: variable holding its port
    default: int  #: its documented default port
    job: str | None  #: Prometheus job scraping it (None: not scraped)
    path: str  #: what to open in a browser / probe
    what: str  #: one-line description for the "where is everything" table
    scheme: str = "http"


#: Every listening process of the local stack, in the order run.sh prints them.
COMPONENTS: tuple[Component, ...] = (
    Component("sender", "MAILGENIUS_SENDER_PORT", 8001, "sender", "/api/health", "sender API (campaigns, emails, webhooks)"),
    Component("importer", "MAILGENIUS_IMPORTER_PORT", 8002, "importer", "/api/health", "importer API (CSV uploads)"),
    Component("exporter", "MAILGENIUS_EXPORTER_PORT", 9300, "exporter", "/dashboard/monitoring", "operator API, monitoring page"),
    Component("sender-worker", "MAILGENIUS_SENDER_WORKER_METRICS_PORT", 9191, "sender-worker", "/metrics", "sender worker metrics"),
    Component("importer-worker", "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT", 9192, "importer-worker", "/metrics", "importer worker metrics"),
    Component("scheduler", "MAILGENIUS_SCHEDULER_METRICS_PORT", 9194, "scheduler", "/metrics", "scheduler metrics (backup, maintenance)"),
    Component("smtp-sink", "MAILGENIUS_SINK_PORT", 1025, None, "", "local SMTP sink (the default relay)", "smtp"),
    Component("prometheus", "MAILGENIUS_PROMETHEUS_PORT", 9090, "prometheus", "/targets", "Prometheus"),
    Component("alertmanager", "MAILGENIUS_ALERTMANAGER_PORT", 9093, "alertmanager", "/#/alerts", "Alertmanager"),
    Component("postgres-exporter", "MAILGENIUS_POSTGRES_EXPORTER_PORT", 9187, "postgres", "/metrics", "Postgres exporter"),
    Component("redis-exporter", "MAILGENIUS_REDIS_EXPORTER_PORT", 9121, "redis", "/metrics", "Redis exporter"),
    Component("node-exporter", "MAILGENIUS_NODE_EXPORTER_PORT", 9100, "node", "/metrics", "node exporter"),
)
BY_NAME = {c.name: c for c in COMPONENTS}
#: service -> (settings attribute of its port, its environment variable)
SERVICES = {
    "sender": ("sender_port", "MAILGENIUS_SENDER_PORT"),
    "importer": ("importer_port", "MAILGENIUS_IMPORTER_PORT"),
    "exporter": ("exporter_port", "MAILGENIUS_EXPORTER_PORT"),
}
#: worker group -> (actor module given to the dramatiq command, queue, metrics port attribute, its
#: environment variable)
WORKERS = {
    "sender": ("sender.actors", "email-sending", "sender_worker_metrics_port", "MAILGENIUS_SENDER_WORKER_METRICS_PORT"),
    "importer": ("importer.actors", "lead-import", "importer_worker_metrics_port", "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT"),
}
