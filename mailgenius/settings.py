"""Settings from the environment, with the documented defaults (docs/design.md): the one place
configuration is read.

:func:`load_settings` reads every variable once, with one set of validators (the ``_int``,
``_float``, ``_bool``... below), and returns a frozen :class:`Settings`. Its deployment-wide
fields (addresses, secrets, ports) sit on :class:`Settings` itself; each area's tunables are a
frozen part of it: ``settings.sender`` (:class:`SenderSettings`), ``settings.importer``
(:class:`ImporterSettings`), ``settings.exporter`` (:class:`ExporterSettings`), ``settings.logs``
(:class:`LogSettings`). Services get them injected (``create_app(settings)``, the actors'
``worker_setup``), never from ``os.environ``; tests change one with
``settings.replace(sender=settings.sender.replace(max_attempts=1))``.

A bad value raises :class:`SettingsError` naming the variable (never a clamp, never a silent
default); entry points turn it into one clear line on stderr and exit 2 (no traceback) with
:func:`settings_or_exit`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlparse


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


def _float(env: Mapping[str, str], name: str, default: float, *, lo: float = 0.0,
           hi: float | None = None, above: bool = False) -> float:
    """A number >= ``lo`` (> ``lo`` with ``above``), <= ``hi`` when given."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(name, f"expected a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(name, f"expected a finite number, got {raw!r}")
    if (value <= lo if above else value < lo):
        raise SettingsError(name, f"must be {'>' if above else '>='} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise SettingsError(name, f"must be <= {hi:g}, got {value:g}")
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


_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _domain(env: Mapping[str, str], name: str) -> str:
    """A DNS domain name (``bounces.example.com``; an IDN is turned into its A-labels), or ""."""
    value = _str(env, name, "").strip().rstrip(".").lower()
    if not value:
        return ""
    try:
        ascii_name = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise SettingsError(name, f"not a domain name: {value!r}") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or len(ascii_name) > 253 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise SettingsError(name, f"not a domain name like bounces.example.com: {value!r}")
    return ascii_name


HTTP = ("http", "https")
#: the shortest secret we accept from the environment (a generated one is longer)
MIN_SECRET_CHARS = 16
#: the shortest Svix signing key, in decoded bytes (Svix and `make run` generate 24)
MIN_WEBHOOK_SECRET_BYTES = 16


def _secret(env: Mapping[str, str], name: str, *, min_chars: int = MIN_SECRET_CHARS) -> str:
    """A secret, or "" when unset; a weak one (too short, one repeated character) stops start-up."""
    value = _str(env, name, "").strip()
    if value and (len(value) < min_chars or len(set(value)) < 4):
        got = (f"got {len(value)} characters" if len(value) < min_chars
               else f"got only {len(set(value))} distinct characters")
        raise SettingsError(name, f"too weak: use at least {min_chars} random characters "
                                  f"(e.g. `openssl rand -hex 24`); {got}")
    return value


def _webhook_secret(env: Mapping[str, str], name: str) -> str:
    """A Svix ``whsec_<base64>`` signing key (or ""); its key must hold enough bytes."""
    import base64
    import binascii

    value = _str(env, name, "").strip()
    if not value:
        return value
    try:
        raw = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(name, "expected whsec_<base64> (the signing secret Resend shows)") from None
    if len(raw) < MIN_WEBHOOK_SECRET_BYTES:
        raise SettingsError(name, f"too weak: the key must hold at least {MIN_WEBHOOK_SECRET_BYTES} bytes "
                                  f"(got {len(raw)})")
    return value


def _names(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of names; unset is ``default``, set but empty is none at all."""
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _token(env: Mapping[str, str], name: str, *, min_chars: int) -> str:
    """A bearer token (or ""); a short one stops start-up."""
    value = _str(env, name, "").strip()
    if value and len(value) < min_chars:
        raise SettingsError(name, f"a webhook token needs at least {min_chars} characters "
                                  f"(got {len(value)}); generate one with `openssl rand -hex 24`")
    return value


def _cidrs(env: Mapping[str, str], name: str) -> tuple:
    """Comma-separated CIDRs (``10.0.0.0/8, 127.0.0.1``) as ip_network objects."""
    out = []
    for part in _str(env, name, "").split(","):
        if part.strip():
            try:
                out.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise SettingsError(name, f"not an IP network (CIDR): {part.strip()!r}") from None
    return tuple(out)


class _Part:
    """A frozen per-area part of :class:`Settings`."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SenderSettings(_Part):
    """The sender's tunables (not part of the deployment contract): each is
    ``MAILGENIUS_SENDER_<FIELD IN CAPITALS>`` (``max_attempts``: ``MAILGENIUS_SENDER_MAX_ATTEMPTS``),
    except the retry budget, ``MAILGENIUS_SEND_RETRY_BUDGET``. Tests use them to shorten back-offs."""

    #: quick provider attempts inside one delivery of a batch (5xx, timeout, connection, 429); after
    #: the last one the batch goes back to dramatiq (sender.delivery.ProviderUnavailable) so no
    #: worker thread sits out a long outage. Lower it to hand back sooner, raise it to ride out
    #: blips in-process.
    max_attempts: int = 3
    #: first back-off between those quick attempts (5xx / timeout), seconds; doubles each attempt
    #: up to backoff_max
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    #: total time a recipient may keep failing with retryable provider errors, measured in
    #: Postgres from its first failed call (messages.retry_since, so it survives redeliveries and
    #: worker restarts), before it is marked ``failed`` with the last error (``retry-failed``
    #: requeues it). Env ``MAILGENIUS_SEND_RETRY_BUDGET`` (the issue's name). Raise it to ride out
    #: longer provider outages; lower it to surface failures to the campaign sooner. Seconds.
    send_retry_budget: float = 900.0
    #: dramatiq retries of a send actor for errors other than a provider outage (Postgres down, a bug)
    actor_max_retries: int = 20
    #: delay before dramatiq redelivers a batch handed back during a provider outage: half the
    #: time the batch has been failing, between these bounds (plus up to 20 % jitter), seconds. The
    #: upper bound (with jitter) stays below stall_seconds, so the sweeper never mistakes a
    #: retrying campaign for a stalled one.
    redelivery_min: float = 2.0
    redelivery_max: float = 30.0
    #: the longest Retry-After we honour before retrying anyway, seconds
    retry_after_max: float = 60.0
    #: one provider HTTP call / SMTP conversation, seconds
    provider_timeout: float = 30.0
    #: SMTP connections a worker process keeps open to its relay, at most (idle or in use): the
    #: relay sees at most processes x this many connections from the fleet (Postfix's default
    #: limit per client is 50)
    smtp_pool_size: int = 16
    #: seconds a worker trusts its cached copy of the email settings (provider)
    settings_cache_seconds: float = 1.0
    #: window of the "recent failure ratio" of the email health check, minutes
    health_window_minutes: int = 5
    #: failure ratio above which the email check reports degraded
    health_failure_ratio: float = 0.05
    #: seconds a batch waits for Redis (rate limit) to come back before giving up (dramatiq retries)
    redis_patience: float = 300.0
    #: the stalled-campaign sweeper (sender/sweeper.py): how often it looks, seconds
    sweep_interval: float = 10.0
    #: a sending campaign with unsent recipients, no batch in progress and no progress for this
    #: long is re-dispatched (its dramatiq messages were lost, e.g. in a Redis outage), seconds
    stall_seconds: float = 45.0
    #: a queued campaign whose ledger is not written after this long is re-dispatched, seconds
    queued_stall_seconds: float = 120.0
    #: the sweeper stays quiet while more messages than this wait in the queue (they may simply
    #: be the stalled campaign's turn coming)
    sweep_max_waiting: int = 100
    #: STARTTLS when the relay offers it (opportunistic, like Postfix's "may";
    #: MAILGENIUS_SMTP_STARTTLS makes it required). 0 turns it off.
    smtp_opportunistic_tls: bool = True
    #: verify the relay's certificate on opportunistic STARTTLS (required STARTTLS always verifies)
    smtp_tls_verify: bool = False
    #: attempts to record a relay's answers while Postgres is unreachable, spaced by this many
    #: seconds (doubling up to 5 s), within send_retry_budget; then the answers go to the local
    #: journal
    record_retry_base: float = 0.2


#: 1 MiB: the longest CSV line the importer holds (importer.reader.DEFAULT_MAX_LINE, the same)
DEFAULT_IMPORT_MAX_LINE = 1 << 20


@dataclass(frozen=True)
class ImporterSettings(_Part):
    """The import job's limits (docs/importer.md); importer.loader.ImportOptions is built from them."""

    #: rows per committed batch: larger is a little faster, smaller gives finer progress, cancel
    #: and resume granularity (MAILGENIUS_IMPORT_BATCH_ROWS)
    batch_rows: int = 25_000
    #: longest accepted field, characters (MAILGENIUS_IMPORT_MAX_FIELD)
    max_field: int = 4096
    #: longest physical line, bytes (MAILGENIUS_IMPORT_MAX_LINE_BYTES, at least 1024)
    max_line: int = DEFAULT_IMPORT_MAX_LINE
    #: test-only: seconds to sleep after each committed batch, to kill a worker mid-import
    #: (MAILGENIUS_IMPORT_BATCH_PAUSE_MS, in milliseconds)
    batch_pause: float = 0.0


#: the shortest alert webhook token accepted (``mailgenius stack-prepare`` generates 43 characters)
MIN_WEBHOOK_TOKEN_CHARS = 24


@dataclass(frozen=True)
class ExporterSettings(_Part):
    """The exporter's own settings (every number must be > 0).

    | variable | default | why change it |
    |---|---|---|
    | ``MAILGENIUS_EXPORTER_REFRESH_SECONDS`` | 5 | seconds between background snapshot refreshes; lower for fresher gauges at more DB load |
    | ``MAILGENIUS_EXPORTER_MAX_SNAPSHOT_AGE`` | 60 | a snapshot older than this is no longer exported (its age still is): stale data must not look live |
    | ``MAILGENIUS_EXPORTER_CAMPAIGN_LIMIT`` | 20 | how many recent or active campaigns get ``mailgenius_campaign_messages`` series (bounds cardinality) |
    | ``MAILGENIUS_EXPORTER_WORKER_STALE_SECONDS`` | 10 | a worker whose last heartbeat is older is counted gone |
    | ``MAILGENIUS_EXPORTER_RATE_WINDOW_HOURS`` | 24 | window of the import success / validation-error ratios |
    | ``MAILGENIUS_EXPORTER_INCIDENT_WINDOW_DAYS`` | 30 | MTTR / MTBF look at incidents started within this many days |
    | ``MAILGENIUS_ALERT_WEBHOOK_TOKEN`` | generated by ``make run`` | ``/api/alerts/webhook`` requires ``Authorization: Bearer <token>`` (Alertmanager's ``http_config.authorization``); unset = the webhook is refused (403). At least 24 characters |
    | ``MAILGENIUS_ALERT_IGNORED`` | ``Watchdog`` | comma-separated alert names that never become incidents (the always-firing Watchdog); set but empty: none |
    | ``MAILGENIUS_EXPORTER_HEALTH_SECONDS`` | 15 | seconds between background runs of the aggregated health checks, which keep ``mailgenius_health_check_up{service="exporter"}`` current for Prometheus |
    | ``MAILGENIUS_SLOW_QUERY_SECONDS`` | 1 | an active Postgres query running longer counts as slow in the operator summary |
    | ``MAILGENIUS_EXPORTER_HTTP_TIMEOUT`` | 2 | seconds to wait for another service's health, Prometheus or Alertmanager |
    """

    refresh_seconds: float = 5.0
    max_snapshot_age: float = 60.0
    campaign_limit: int = 20
    worker_stale_seconds: float = 10.0
    rate_window_hours: float = 24.0
    incident_window_days: float = 30.0
    webhook_token: str = ""
    ignored_alerts: tuple[str, ...] = ("Watchdog",)
    slow_query_seconds: float = 1.0
    http_timeout: float = 2.0
    health_seconds: float = 15.0


#: default cap of the WARNING+ log stream in Redis (mailgenius/logstream.py)
DEFAULT_LOG_STREAM_MAXLEN = 10_000


@dataclass(frozen=True)
class LogSettings(_Part):
    """Logs beyond the level (``MAILGENIUS_LOG_LEVEL``, on :class:`Settings`)."""

    #: approximate cap of the Redis log stream the monitoring page reads
    #: (``MAILGENIUS_LOG_STREAM_MAXLEN``; 0 disables the stream)
    stream_maxlen: int = DEFAULT_LOG_STREAM_MAXLEN


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
    #: the domain whose ``bounces+*`` addresses reach the bounce mailbox; set, the SMTP envelope
    #: sender of every message is its signed VERP address ``bounces+<id>-<mac>@<domain>``
    #: (sender/dsn.py), so a DSN is matched by the address it comes back to; "" = the From address
    bounce_domain: str = ""
    public_url: str = "http://127.0.0.1:8001"
    #: networks of the reverse proxies whose X-Forwarded-For names the client (sign-in throttle)
    trusted_proxies: tuple = ()
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
    #: the areas' own tunables
    sender: SenderSettings = field(default_factory=SenderSettings)
    importer: ImporterSettings = field(default_factory=ImporterSettings)
    exporter: ExporterSettings = field(default_factory=ExporterSettings)
    logs: LogSettings = field(default_factory=LogSettings)

    @property
    def broker_kind(self) -> str:
        return "rabbitmq" if self.broker_url.startswith(("amqp://", "amqps://")) else "redis"

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


#: variables that may instead be given as ``<NAME>_FILE``: a path whose content is the value
#: (Docker / Kubernetes secrets mounted as files; one trailing newline is dropped)
FILE_VARIABLES = ("DATABASE_URL", "DATABASE_PASSWORD", "REDIS_URL", "BROKER_URL", "RESEND_API_KEY",
                  "MAILGENIUS_RESEND_WEBHOOK_SECRET", "MAILGENIUS_TRACKING_SECRET",
                  "MAILGENIUS_SMTP_PASSWORD", "MAILGENIUS_ALERT_WEBHOOK_TOKEN")


def with_secret_files(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` with every ``<NAME>_FILE`` of :data:`FILE_VARIABLES` read into ``<NAME>``."""
    files = {n: env[n + "_FILE"] for n in FILE_VARIABLES if env.get(n + "_FILE")}
    if not files:
        return env
    out = dict(env)
    for name, path in files.items():
        if env.get(name):
            raise SettingsError(name + "_FILE", f"both {name} and {name}_FILE are set; set one")
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read()
        except OSError as exc:
            raise SettingsError(name + "_FILE", f"cannot read {path}: {exc.strerror}") from None
        value = value[:-1] if value.endswith("\n") else value
        if value.endswith("\r"):
            value = value[:-1]
        if not value:
            raise SettingsError(name + "_FILE", f"{path} is empty")
        out[name] = value
    return out


def _database_url(env: Mapping[str, str]) -> str:
    """``DATABASE_URL``, with ``DATABASE_PASSWORD`` (or ``DATABASE_PASSWORD_FILE``) put into it.

    The password apart lets a deployment keep it out of the environment and out of process
    listings (compose and Kubernetes mount it as a secret file) while the URL stays a plain
    variable. Setting both a password in the URL and ``DATABASE_PASSWORD`` is an error (which one
    was meant?).
    """
    url = _url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("postgresql", "postgres"))
    password = env.get("DATABASE_PASSWORD") or ""
    if not password:
        return url
    parsed = urlparse(url)
    if parsed.password is not None:
        raise SettingsError("DATABASE_PASSWORD", "DATABASE_URL already holds a password; set one of them")
    if not parsed.username:
        raise SettingsError("DATABASE_PASSWORD", "DATABASE_URL names no user for the password "
                                                 "(postgresql://USER@host/db)")
    userinfo, _, hostpart = parsed.netloc.rpartition("@")
    netloc = f"{userinfo}:{quote(password, safe='')}@{hostpart}"
    return parsed._replace(netloc=netloc).geturl()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every variable; raise SettingsError on the first bad one."""
    env = with_secret_files(os.environ if environ is None else environ)
    redis_url = _url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix"))
    data_dir = _str(env, "MAILGENIUS_DATA_DIR", "./var")
    return Settings(
        database_url=_database_url(env),
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
        resend_webhook_secret=_webhook_secret(env, "MAILGENIUS_RESEND_WEBHOOK_SECRET"),
        bounce_webhook_secret=_secret(env, "MAILGENIUS_BOUNCE_WEBHOOK_SECRET"),
        bounce_mailbox_host=_str(env, "MAILGENIUS_BOUNCE_MAILBOX_HOST", ""),
        bounce_mailbox_protocol=_choice(env, "MAILGENIUS_BOUNCE_MAILBOX_PROTOCOL", "pop3", ("pop3", "imap")),
        bounce_mailbox_port=_int(env, "MAILGENIUS_BOUNCE_MAILBOX_PORT", 0, lo=0, hi=65535),
        bounce_mailbox_user=_str(env, "MAILGENIUS_BOUNCE_MAILBOX_USER", ""),
        bounce_mailbox_password=_str(env, "MAILGENIUS_BOUNCE_MAILBOX_PASSWORD", ""),
        bounce_mailbox_tls=_choice(env, "MAILGENIUS_BOUNCE_MAILBOX_TLS", "ssl", ("ssl", "starttls", "none")),
        bounce_mailbox_interval=_float(env, "MAILGENIUS_BOUNCE_MAILBOX_INTERVAL", 60.0, lo=1.0),
        bounce_domain=_domain(env, "MAILGENIUS_BOUNCE_DOMAIN"),
        public_url=_url(env, "MAILGENIUS_PUBLIC_URL", "http://127.0.0.1:8001", HTTP),
        trusted_proxies=_cidrs(env, "MAILGENIUS_TRUSTED_PROXIES"),
        tracking_secret=_secret(env, "MAILGENIUS_TRACKING_SECRET"),
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
        sender=_sender(env),
        importer=_importer(env),
        exporter=_exporter(env),
        logs=LogSettings(
            stream_maxlen=_int(env, "MAILGENIUS_LOG_STREAM_MAXLEN", DEFAULT_LOG_STREAM_MAXLEN, lo=0, hi=10_000_000)),
    )


def _sender(env: Mapping[str, str]) -> SenderSettings:
    d = SenderSettings()
    return SenderSettings(
        max_attempts=_int(env, "MAILGENIUS_SENDER_MAX_ATTEMPTS", d.max_attempts, lo=1, hi=100),
        backoff_base=_float(env, "MAILGENIUS_SENDER_BACKOFF_BASE", d.backoff_base),
        backoff_max=_float(env, "MAILGENIUS_SENDER_BACKOFF_MAX", d.backoff_max),
        send_retry_budget=_float(env, "MAILGENIUS_SEND_RETRY_BUDGET", d.send_retry_budget),
        actor_max_retries=_int(env, "MAILGENIUS_SENDER_ACTOR_MAX_RETRIES", d.actor_max_retries),
        redelivery_min=_float(env, "MAILGENIUS_SENDER_REDELIVERY_MIN", d.redelivery_min),
        redelivery_max=_float(env, "MAILGENIUS_SENDER_REDELIVERY_MAX", d.redelivery_max),
        retry_after_max=_float(env, "MAILGENIUS_SENDER_RETRY_AFTER_MAX", d.retry_after_max),
        provider_timeout=_float(env, "MAILGENIUS_SENDER_PROVIDER_TIMEOUT", d.provider_timeout, above=True),
        smtp_pool_size=_int(env, "MAILGENIUS_SENDER_SMTP_POOL_SIZE", d.smtp_pool_size, lo=1),
        settings_cache_seconds=_float(env, "MAILGENIUS_SENDER_SETTINGS_CACHE_SECONDS", d.settings_cache_seconds),
        health_window_minutes=_int(env, "MAILGENIUS_SENDER_HEALTH_WINDOW_MINUTES", d.health_window_minutes, lo=1),
        health_failure_ratio=_float(env, "MAILGENIUS_SENDER_HEALTH_FAILURE_RATIO", d.health_failure_ratio, hi=1.0),
        redis_patience=_float(env, "MAILGENIUS_SENDER_REDIS_PATIENCE", d.redis_patience),
        sweep_interval=_float(env, "MAILGENIUS_SENDER_SWEEP_INTERVAL", d.sweep_interval, above=True),
        stall_seconds=_float(env, "MAILGENIUS_SENDER_STALL_SECONDS", d.stall_seconds, above=True),
        queued_stall_seconds=_float(env, "MAILGENIUS_SENDER_QUEUED_STALL_SECONDS", d.queued_stall_seconds,
                                    above=True),
        sweep_max_waiting=_int(env, "MAILGENIUS_SENDER_SWEEP_MAX_WAITING", d.sweep_max_waiting),
        smtp_opportunistic_tls=_bool(env, "MAILGENIUS_SENDER_SMTP_OPPORTUNISTIC_TLS", d.smtp_opportunistic_tls),
        smtp_tls_verify=_bool(env, "MAILGENIUS_SENDER_SMTP_TLS_VERIFY", d.smtp_tls_verify),
        record_retry_base=_float(env, "MAILGENIUS_SENDER_RECORD_RETRY_BASE", d.record_retry_base, above=True),
    )


def _importer(env: Mapping[str, str]) -> ImporterSettings:
    d = ImporterSettings()
    return ImporterSettings(
        batch_rows=_int(env, "MAILGENIUS_IMPORT_BATCH_ROWS", d.batch_rows, lo=1),
        max_field=_int(env, "MAILGENIUS_IMPORT_MAX_FIELD", d.max_field, lo=1),
        max_line=_int(env, "MAILGENIUS_IMPORT_MAX_LINE_BYTES", d.max_line, lo=1024),
        batch_pause=_int(env, "MAILGENIUS_IMPORT_BATCH_PAUSE_MS", 0, lo=0) / 1000.0,
    )


def _exporter(env: Mapping[str, str]) -> ExporterSettings:
    d = ExporterSettings()
    return ExporterSettings(
        refresh_seconds=_float(env, "MAILGENIUS_EXPORTER_REFRESH_SECONDS", d.refresh_seconds, above=True),
        max_snapshot_age=_float(env, "MAILGENIUS_EXPORTER_MAX_SNAPSHOT_AGE", d.max_snapshot_age, above=True),
        campaign_limit=_int(env, "MAILGENIUS_EXPORTER_CAMPAIGN_LIMIT", d.campaign_limit, lo=1),
        worker_stale_seconds=_float(env, "MAILGENIUS_EXPORTER_WORKER_STALE_SECONDS", d.worker_stale_seconds,
                                    above=True),
        rate_window_hours=_float(env, "MAILGENIUS_EXPORTER_RATE_WINDOW_HOURS", d.rate_window_hours, above=True),
        incident_window_days=_float(env, "MAILGENIUS_EXPORTER_INCIDENT_WINDOW_DAYS", d.incident_window_days,
                                    above=True),
        webhook_token=_token(env, "MAILGENIUS_ALERT_WEBHOOK_TOKEN", min_chars=MIN_WEBHOOK_TOKEN_CHARS),
        ignored_alerts=_names(env, "MAILGENIUS_ALERT_IGNORED", d.ignored_alerts),
        slow_query_seconds=_float(env, "MAILGENIUS_SLOW_QUERY_SECONDS", d.slow_query_seconds, above=True),
        http_timeout=_float(env, "MAILGENIUS_EXPORTER_HTTP_TIMEOUT", d.http_timeout, above=True),
        health_seconds=_float(env, "MAILGENIUS_EXPORTER_HEALTH_SECONDS", d.health_seconds, above=True),
    )


def settings_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """:func:`load_settings` for a command-line entry point: a bad value is one line on stderr and
    exit code 2."""
    import sys

    try:
        return load_settings(environ)
    except SettingsError as exc:
        print(f"mailgenius: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# -- process facts read from the environment (not settings, but read here too, so that this
# -- module stays the only reader of os.environ below the console) -----------------------------

#: "1" in the processes ``mailgenius worker`` starts (console/basics.py sets it): only there do
#: actor modules start their threads and the log stream (not in test processes importing them)
WORKER_FLAG = "MAILGENIUS_WORKER"
#: the alert contract's file (mailgenius/contract.py); unset: alerting/rules.yml of the checkout
RULES_FILE_VARIABLE = "MAILGENIUS_RULES_FILE"


def in_worker_process(environ: Mapping[str, str] | None = None) -> bool:
    """True in a dramatiq worker process started by ``mailgenius worker``."""
    return (os.environ if environ is None else environ).get(WORKER_FLAG) == "1"


def rules_file(environ: Mapping[str, str] | None = None) -> str | None:
    """``$MAILGENIUS_RULES_FILE``, or None when unset or empty."""
    return (os.environ if environ is None else environ).get(RULES_FILE_VARIABLE) or None
