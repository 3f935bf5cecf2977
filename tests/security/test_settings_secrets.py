"""Weak secrets stop start-up with one line naming the variable."""

from __future__ import annotations

import base64

import pytest

from mailgenius.settings import SettingsError, load_settings


@pytest.mark.parametrize("variable, value", [
    ("MAILGENIUS_TRACKING_SECRET", "secret"),
    ("MAILGENIUS_TRACKING_SECRET", "a" * 40),                       # one repeated character
    ("MAILGENIUS_RESEND_WEBHOOK_SECRET", "whsec_dGVzdA=="),          # 4 bytes
    ("MAILGENIUS_RESEND_WEBHOOK_SECRET", "whsec_not base64!"),
    ("MAILGENIUS_BOUNCE_WEBHOOK_SECRET", "hunter2"),
])
def test_weak_secrets_are_refused_naming_the_variable(variable, value):
    with pytest.raises(SettingsError) as exc:
        load_settings({variable: value})
    assert exc.value.variable == variable
    assert str(exc.value).startswith(variable)


def test_strong_secrets_and_unset_ones_are_accepted():
    whsec = "whsec_" + base64.b64encode(bytes(range(24))).decode()
    s = load_settings({"MAILGENIUS_TRACKING_SECRET": "k3Jd9-a8Qz7Lm2Pw", "MAILGENIUS_RESEND_WEBHOOK_SECRET": whsec})
    assert s.tracking_secret == "k3Jd9-a8Qz7Lm2Pw" and s.resend_webhook_secret == whsec
    assert load_settings({}).tracking_secret == ""  # unset: generated once and kept in Postgres
