"""Files that hold secrets (``stack.env``, generated webhook secrets and tokens), created with
mode 0600 from the first byte: written to a new temporary file opened ``O_CREAT | O_EXCL`` with
mode 0600 in the same directory, then renamed over the target. There is never a moment when
another user could open the file (a ``chmod`` after ``write_text`` leaves one, and a file that
already existed with mode 0644 would keep it through ``O_TRUNC``)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: mode of every secret file
SECRET_MODE = 0o600


def write_secret(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, mode 0600 from creation; the directory is created
    (mode 0700) when missing."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), SECRET_MODE)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_or_create(path: Path | str, make) -> str:
    """The secret kept in ``path`` (stripped), or a new one from ``make()`` written there (0600)."""
    path = Path(path)
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = make()
    write_secret(path, value + "\n")
    return value


#: the exporter's incident webhook token (also ``secrets/alert_webhook_token`` for Alertmanager)
ALERT_WEBHOOK_TOKEN_VAR = "MAILGENIUS_ALERT_WEBHOOK_TOKEN"


def alert_webhook_token(secrets_dir: Path | str, configured: str | None = None) -> str:
    """The incident webhook token: the configured one (written to the file Alertmanager reads
    when the file differs), else the one kept in ``secrets_dir/alert_webhook_token``, else a new
    random one (43 characters) written there, mode 0600."""
    path = Path(secrets_dir) / "alert_webhook_token"
    configured = (configured or "").strip()
    if configured:
        if not path.exists() or path.read_text().strip() != configured:
            write_secret(path, configured)
        return configured
    return read_or_create(path, lambda: secrets.token_urlsafe(32))
