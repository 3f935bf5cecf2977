import subprocess
import sys
from urllib.parse import unquote, urlparse

import pytest

from mailgenius.settings import SettingsError, load_settings


def test_defaults_match_design():
    s = load_settings({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/mailgenius"
    assert s.redis_url == s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.email_provider == "smtp"
    assert (s.smtp_host, s.smtp_port) == ("127.0.0.1", 1025)
    assert s.upload_max_bytes == 1 << 30
    assert (s.sender_port, s.importer_port, s.exporter_port) == (8001, 8002, 9300)
    assert s.broker_kind == "redis"


def test_broker_defaults_to_redis_url_and_accepts_amqp():
    s = load_settings({"REDIS_URL": "redis://10.0.0.1:6380/2"})
    assert s.broker_url == "redis://10.0.0.1:6380/2"
    s = load_settings({"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/"})
    assert s.broker_kind == "rabbitmq"


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"MAILGENIUS_SMTP_PORT": "abc"}, "MAILGENIUS_SMTP_PORT"),
        ({"MAILGENIUS_SMTP_PORT": "70000"}, "MAILGENIUS_SMTP_PORT"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://127.0.0.1"}, "REDIS_URL"),
        ({"MAILGENIUS_EMAIL_PROVIDER": "sendgrid"}, "MAILGENIUS_EMAIL_PROVIDER"),
        ({"MAILGENIUS_UPLOAD_MAX_BYTES": "-1"}, "MAILGENIUS_UPLOAD_MAX_BYTES"),
        ({"MAILGENIUS_SMTP_STARTTLS": "maybe"}, "MAILGENIUS_SMTP_STARTTLS"),
    ],
)
def test_bad_value_names_the_variable(env, variable):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert variable in str(info.value)


def test_bad_value_stops_startup_with_one_line_and_no_traceback():
    # Given a bad port, When the CLI starts, Then it exits 2 with one line naming the variable
    proc = subprocess.run(
        [sys.executable, "-m", "console", "serve", "sender"],
        env={"MAILGENIUS_SENDER_PORT": "eighty", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "MAILGENIUS_SENDER_PORT" in lines[0]
    assert "Traceback" not in proc.stderr


# -- <NAME>_FILE secrets (Docker / Kubernetes secrets mounted as files) -----------------------

def test_secret_files_are_read_and_lose_one_trailing_newline(tmp_path):
    db = tmp_path / "database_url"
    db.write_text("postgresql://app:s3cret@db:5432/mailgenius\n")
    tracking = tmp_path / "tracking"
    tracking.write_text("9f8e7d6c5b4a39281706f5e4d3c2b1a0" + "\n")
    s = load_settings({"DATABASE_URL_FILE": str(db), "MAILGENIUS_TRACKING_SECRET_FILE": str(tracking)})
    assert s.database_url == "postgresql://app:s3cret@db:5432/mailgenius"
    assert s.tracking_secret == "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    # the value read from a file is validated like the variable itself
    db.write_text("mysql://nope\n")
    with pytest.raises(SettingsError) as exc:
        load_settings({"DATABASE_URL_FILE": str(db)})
    assert exc.value.variable == "DATABASE_URL"


def test_database_password_file_goes_into_the_url(tmp_path):
    """compose and Kubernetes keep the password out of DATABASE_URL: a file, quoted into the URL."""
    pw = tmp_path / "postgres_password"
    pw.write_text("p@ss:w/rd ção\n")
    s = load_settings({"DATABASE_URL": "postgresql://app@db:5432/mailgenius", "DATABASE_PASSWORD_FILE": str(pw)})
    assert s.database_url == "postgresql://app:p%40ss%3Aw%2Frd%20%C3%A7%C3%A3o@db:5432/mailgenius"
    assert urlparse(s.database_url).hostname == "db" and unquote(urlparse(s.database_url).password) == "p@ss:w/rd ção"
    # without a password nothing changes; two passwords, or no user to give it to, are refused
    assert load_settings({"DATABASE_URL": "postgresql://app@db/x"}).database_url == "postgresql://app@db/x"
    for url, words in (("postgresql://app:other@db/x", "already holds a password"),
                       ("postgresql://db/x", "names no user")):
        with pytest.raises(SettingsError) as exc:
            load_settings({"DATABASE_URL": url, "DATABASE_PASSWORD": "secret"})
        assert exc.value.variable == "DATABASE_PASSWORD" and words in str(exc.value)


@pytest.mark.parametrize("case", ["missing", "empty", "both"])
def test_bad_secret_file_names_the_variable(tmp_path, case):
    path = tmp_path / "secret"
    env = {"RESEND_API_KEY_FILE": str(path)}
    if case == "empty":
        path.write_text("")
    if case == "both":
        path.write_text("re_123")
        env["RESEND_API_KEY"] = "re_456"
    with pytest.raises(SettingsError) as exc:
        load_settings(env)
    assert exc.value.variable == "RESEND_API_KEY_FILE"
    assert {"missing": "cannot read", "empty": "is empty", "both": "set one"}[case] in str(exc.value)


def test_exporter_reads_its_webhook_token_from_a_file(tmp_path):
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    cfg = load_settings({"MAILGENIUS_ALERT_WEBHOOK_TOKEN_FILE": str(token)}).exporter
    assert cfg.webhook_token == "t" * 32


# -- the areas' parts: one loader, one set of validators ---------------------------------------

def test_parts_default_to_the_documented_values():
    from importer.loader import ImportOptions
    from importer.reader import DEFAULT_MAX_LINE
    from mailgenius.logstream import DEFAULT_MAXLEN

    s = load_settings({})
    assert (s.sender.max_attempts, s.sender.backoff_base, s.sender.send_retry_budget) == (3, 0.5, 900.0)
    assert (s.sender.stall_seconds, s.sender.sweep_interval, s.sender.smtp_pool_size) == (45.0, 10.0, 16)
    assert s.sender.smtp_opportunistic_tls is True and s.sender.smtp_tls_verify is False
    assert ImportOptions.from_settings(s) == ImportOptions()
    assert s.importer.max_line == DEFAULT_MAX_LINE
    assert (s.exporter.refresh_seconds, s.exporter.campaign_limit, s.exporter.ignored_alerts) == (5.0, 20, ("Watchdog",))
    assert s.logs.stream_maxlen == DEFAULT_MAXLEN == 10_000


def test_parts_read_their_variables():
    s = load_settings({"MAILGENIUS_SENDER_MAX_ATTEMPTS": "2", "MAILGENIUS_SENDER_BACKOFF_BASE": "0.2",
                       "MAILGENIUS_SEND_RETRY_BUDGET": "60", "MAILGENIUS_SENDER_SMTP_OPPORTUNISTIC_TLS": "0",
                       "MAILGENIUS_IMPORT_BATCH_ROWS": "500", "MAILGENIUS_IMPORT_BATCH_PAUSE_MS": "250",
                       "MAILGENIUS_EXPORTER_REFRESH_SECONDS": "0.5", "MAILGENIUS_ALERT_IGNORED": "",
                       "MAILGENIUS_LOG_STREAM_MAXLEN": "0"})
    assert (s.sender.max_attempts, s.sender.backoff_base, s.sender.send_retry_budget) == (2, 0.2, 60.0)
    assert s.sender.smtp_opportunistic_tls is False
    assert (s.importer.batch_rows, s.importer.batch_pause) == (500, 0.25)
    assert (s.exporter.refresh_seconds, s.exporter.ignored_alerts) == (0.5, ())
    assert s.logs.stream_maxlen == 0


@pytest.mark.parametrize(
    "variable, value",
    [
        # sender (was a SystemExit at import of sender/config.py, or silently accepted)
        ("MAILGENIUS_SENDER_MAX_ATTEMPTS", "three"),
        ("MAILGENIUS_SENDER_MAX_ATTEMPTS", "0"),
        ("MAILGENIUS_SENDER_BACKOFF_BASE", "-1"),
        ("MAILGENIUS_SENDER_BACKOFF_BASE", "nan"),
        ("MAILGENIUS_SEND_RETRY_BUDGET", "soon"),
        ("MAILGENIUS_SENDER_SMTP_POOL_SIZE", "0"),
        ("MAILGENIUS_SENDER_SWEEP_INTERVAL", "0"),
        ("MAILGENIUS_SENDER_HEALTH_FAILURE_RATIO", "1.5"),
        ("MAILGENIUS_SENDER_SMTP_OPPORTUNISTIC_TLS", "maybe"),
        # importer (was clamped: 0 rows became 1, a 10-byte line limit became 1024)
        ("MAILGENIUS_IMPORT_BATCH_ROWS", "0"),
        ("MAILGENIUS_IMPORT_MAX_LINE_BYTES", "10"),
        ("MAILGENIUS_IMPORT_MAX_FIELD", "big"),
        ("MAILGENIUS_IMPORT_BATCH_PAUSE_MS", "-5"),
        # exporter
        ("MAILGENIUS_EXPORTER_REFRESH_SECONDS", "0"),
        ("MAILGENIUS_EXPORTER_CAMPAIGN_LIMIT", "twenty"),
        ("MAILGENIUS_SLOW_QUERY_SECONDS", "-1"),
        ("MAILGENIUS_ALERT_WEBHOOK_TOKEN", "short"),
        # logs
        ("MAILGENIUS_LOG_STREAM_MAXLEN", "lots"),
        ("MAILGENIUS_LOG_STREAM_MAXLEN", "-1"),
    ],
)
def test_bad_area_value_is_a_settings_error_naming_the_variable(variable, value):
    # a SystemExit would escape pytest.raises(SettingsError); a clamp would raise nothing
    with pytest.raises(SettingsError) as info:
        load_settings({variable: value})
    assert info.value.variable == variable
    assert variable in str(info.value)


def test_bad_sender_value_stops_the_worker_with_one_line_and_no_traceback():
    # Given a bad sender tunable, When `mailgenius worker sender` starts, Then it exits 2 naming it
    # before any worker process is started
    proc = subprocess.run(
        [sys.executable, "-m", "console", "worker", "sender"],
        env={"MAILGENIUS_SENDER_MAX_ATTEMPTS": "many", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "MAILGENIUS_SENDER_MAX_ATTEMPTS" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value,expected", [("Bounces.Example.com.", "bounces.example.com"),
                                            ("retour.exemplo-ção.br", "retour.xn--exemplo-o-s2a7b.br"),
                                            ("", "")])
def test_bounce_domain(value, expected):
    assert load_settings({"MAILGENIUS_BOUNCE_DOMAIN": value}).bounce_domain == expected


@pytest.mark.parametrize("value", ["localhost", "bounces@example.com", "-x.example.com", "a..b.com", "x" * 64 + ".com"])
def test_a_bad_bounce_domain_names_the_variable(value):
    with pytest.raises(SettingsError) as exc:
        load_settings({"MAILGENIUS_BOUNCE_DOMAIN": value})
    assert exc.value.variable == "MAILGENIUS_BOUNCE_DOMAIN"
