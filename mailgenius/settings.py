"""Settings from the environment, with the documented defaults (DESIGN.md).

A bad value raises :class:`SettingsError` naming the variable; entry points turn it into one
clear line on stderr and exit 2 (no traceback).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse


class SettingsError(ValueError):
    """A configuration variable holds a value we cannot use."""

    def __init__(self, variable: str, message: str):
        self.variable = variable
        super().__init__(f"{variable}: {message}")


#: Default Postgres URL: the local cluster, trust auth, database ``mailgenius``.
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/mailgenius"
#: Default Redis URL: cache, rate limits and (by default) the dramatiq broker.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: 1 GiB: the largest upload accepted by the importer.
DEFAULT_UPLOAD_MAX_BYTES = 1 << 30


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name)
    return default if value is None or value == "" else value


def _int(env: Mapping[str, str], name: str, default: int, *, lo: int = 0, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(name, f"expected an integer, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise SettingsError(name, f"must be {bound}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, lo: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(name, f"expected a number, got {raw!r}") from None
    if value < lo:
        raise SettingsError(name, f"must be >= {lo}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise SettingsError(name, f"expected true/false, got {raw!r}")


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = _str(env, name, default)
    parsed = urlparse(value)
    if parsed.scheme not in schemes:
        raise SettingsError(name, f"scheme must be one of {', '.join(schemes)}; got {value!r}")
    if not parsed.hostname and parsed.scheme not in ("unix",):
        raise SettingsError(name, f"no host in {value!r}")
    try:
        parsed.port  # noqa: B018 - validates the port
    except ValueError:
        raise SettingsError(name, f"bad port in {value!r}") from None
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(env, name, default).strip().lower()
    if value not in choices:
        raise SettingsError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


HTTP = ("http", "https")


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_REDIS_URL
    #: prefix of every Redis key we own (and of dramatiq's namespace); tests isolate with it
    redis_prefix: str = "mailgenius"
    email_provider: str = "smtp"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_starttls: bool = False
    smtp_username: str = ""
    smtp_password: str = ""
    resend_base_url: str = "https://api.resend.com"
    resend_api_key: str = ""
    resend_webhook_secret: str = ""
    #: shared secret of the signed bounce/complaint webhook for other ESPs (sender/bounces.py)
    bounce_webhook_secret: str = ""
    #: the bounce mailbox (POP3 or IMAP) read for DSNs and ARF reports (sender/mailbox.py); "" = off
    bounce_mailbox_host: str = ""
    bounce_mailbox_protocol: str = "pop3"
    #: 0 = the protocol's port (995 / 993 with ssl, 110 / 143 otherwise)
    bounce_mailbox_port: int = 0
    bounce_mailbox_user: str = ""
    bounce_mailbox_password: str = ""
    #: ssl (POP3S, port 995), starttls (STLS on port 110) or none (loopback/tests only)
    bounce_mailbox_tls: str = "ssl"
    bounce_mailbox_interval: float = 60.0
    public_url: str = "http://127.0.0.1:8001"
    tracking_secret: str = ""
    upload_dir: str = "./var/uploads"
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES
    prometheus_url: str = "http://127.0.0.1:9090"
    alertmanager_url: str = "http://127.0.0.1:9093"
    sender_url: str = "http://127.0.0.1:8001"
    importer_url: str = "http://127.0.0.1:8002"
    exporter_url: str = "http://127.0.0.1:9300"
    host: str = "127.0.0.1"
    sender_port: int = 8001
    importer_port: int = 8002
    exporter_port: int = 9300
    sender_worker_metrics_port: int = 9191
    importer_worker_metrics_port: int = 9192
    sink_host: str = "127.0.0.1"
    sink_port: int = 1025
    sink_dir: str = "./var/sink"
    log_level: str = "INFO"
    #: per-check timeout of health checks, seconds
    health_timeout: float = 1.0
    #: asyncpg pool bounds per process
    db_pool_min: int = 1
    db_pool_max: int = 10
    #: DNS resolver for /api/email/test-authentication ("" = system resolver)
    dns_resolver: str = ""
    dns_port: int = 53
    data_dir: str = "./var"
    #: Redis broker: commands in a million that also requeue the messages of dead workers
    broker_maintenance_chance: int = 1000
    #: Redis broker: ms without a heartbeat after which a worker is dead and its messages
    #: are requeued (tests lower both to redeliver a killed worker's message within seconds)
    broker_heartbeat_timeout_ms: int = 15_000
    extra: dict = field(default_factory=dict)

    @property
    def broker_kind(self) -> str:
        return "rabbitmq" if self.broker_url.startswith(("amqp://", "amqps://")) else "redis"

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every variable; raise SettingsError on the first bad one."""
    env = os.environ if environ is None else environ
    redis_url = _url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix"))
    data_dir = _str(env, "MAILGENIUS_DATA_DIR", "./var")
    return Settings(
        database_url=_url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("postgresql", "postgres")),
        redis_url=redis_url,
        broker_url=_url(env, "BROKER_URL", redis_url, ("redis", "rediss", "unix", "amqp", "amqps")),
        redis_prefix=_str(env, "MAILGENIUS_REDIS_PREFIX", "mailgenius"),
        email_provider=_choice(env, "MAILGENIUS_EMAIL_PROVIDER", "smtp", ("smtp", "resend")),
        smtp_host=_str(env, "MAILGENIUS_SMTP_HOST", "127.0.0.1"),
        smtp_port=_int(env, "MAILGENIUS_SMTP_PORT", 1025, lo=1, hi=65535),
        smtp_starttls=_bool(env, "MAILGENIUS_SMTP_STARTTLS", False),
        smtp_username=_str(env, "MAILGENIUS_SMTP_USERNAME", ""),
        smtp_password=_str(env, "MAILGENIUS_SMTP_PASSWORD", ""),
        resend_base_url=_url(env, "MAILGENIUS_RESEND_BASE_URL", "https://api.resend.com", HTTP),
        resend_api_key=_str(env, "RESEND_API_KEY", ""),
        resend_webhook_secret=_str(env, "MAILGENIUS_RESEND_WEBHOOK_SECRET", ""),
        bounce_webhook_secret=_str(env, "MAILGENIUS_BOUNCE_WEBHOOK_SECRET", ""),
        bounce_mailbox_host=_str(env, "MAILGENIUS_BOUNCE_MAILBOX_HOST", ""),
        bounce_mailbox_protocol=_choice(env, "MAILGENIUS_BOUNCE_MAILBOX_PROTOCOL", "pop3", ("pop3", "imap")),
        bounce_mailbox_port=_int(env, "MAILGENIUS_BOUNCE_MAILBOX_PORT", 0, lo=0, hi=65535),
        bounce_mailbox_user=_str(env, "MAILGENIUS_BOUNCE_MAILBOX_USER", ""),
        bounce_mailbox_password=_str(env, "MAILGENIUS_BOUNCE_MAILBOX_PASSWORD", ""),
        bounce_mailbox_tls=_choice(env, "MAILGENIUS_BOUNCE_MAILBOX_TLS", "ssl", ("ssl", "starttls", "none")),
        bounce_mailbox_interval=_float(env, "MAILGENIUS_BOUNCE_MAILBOX_INTERVAL", 60.0, lo=1.0),
        public_url=_url(env, "MAILGENIUS_PUBLIC_URL", "http://127.0.0.1:8001", HTTP),
        tracking_secret=_str(env, "MAILGENIUS_TRACKING_SECRET", ""),
        upload_dir=_str(env, "MAILGENIUS_UPLOAD_DIR", os.path.join(data_dir, "uploads")),
        upload_max_bytes=_int(env, "MAILGENIUS_UPLOAD_MAX_BYTES", DEFAULT_UPLOAD_MAX_BYTES, lo=1),
        prometheus_url=_url(env, "MAILGENIUS_PROMETHEUS_URL", "http://127.0.0.1:9090", HTTP),
        alertmanager_url=_url(env, "MAILGENIUS_ALERTMANAGER_URL", "http://127.0.0.1:9093", HTTP),
        sender_url=_url(env, "MAILGENIUS_SENDER_URL", "http://127.0.0.1:8001", HTTP),
        importer_url=_url(env, "MAILGENIUS_IMPORTER_URL", "http://127.0.0.1:8002", HTTP),
        exporter_url=_url(env, "MAILGENIUS_EXPORTER_URL", "http://127.0.0.1:9300", HTTP),
        host=_str(env, "MAILGENIUS_HOST", "127.0.0.1"),
        sender_port=_int(env, "MAILGENIUS_SENDER_PORT", 8001, lo=1, hi=65535),
        importer_port=_int(env, "MAILGENIUS_IMPORTER_PORT", 8002, lo=1, hi=65535),
        exporter_port=_int(env, "MAILGENIUS_EXPORTER_PORT", 9300, lo=1, hi=65535),
        sender_worker_metrics_port=_int(env, "MAILGENIUS_SENDER_WORKER_METRICS_PORT", 9191, lo=1, hi=65535),
        importer_worker_metrics_port=_int(env, "MAILGENIUS_IMPORTER_WORKER_METRICS_PORT", 9192, lo=1, hi=65535),
        sink_host=_str(env, "MAILGENIUS_SINK_HOST", "127.0.0.1"),
        sink_port=_int(env, "MAILGENIUS_SINK_PORT", 1025, lo=1, hi=65535),
        sink_dir=_str(env, "MAILGENIUS_SINK_DIR", os.path.join(data_dir, "sink")),
        log_level=_choice(env, "MAILGENIUS_LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
        health_timeout=_float(env, "MAILGENIUS_HEALTH_TIMEOUT", 1.0, lo=0.05),
        db_pool_min=_int(env, "MAILGENIUS_DB_POOL_MIN", 1, lo=0, hi=100),
        db_pool_max=_int(env, "MAILGENIUS_DB_POOL_MAX", 10, lo=1, hi=200),
        dns_resolver=_str(env, "MAILGENIUS_DNS_RESOLVER", ""),
        dns_port=_int(env, "MAILGENIUS_DNS_PORT", 53, lo=1, hi=65535),
        data_dir=data_dir,
        broker_maintenance_chance=_int(env, "MAILGENIUS_BROKER_MAINTENANCE_CHANCE", 1000, lo=0, hi=1_000_000),
        broker_heartbeat_timeout_ms=_int(env, "MAILGENIUS_BROKER_HEARTBEAT_TIMEOUT_MS", 15_000, lo=100),
    )
