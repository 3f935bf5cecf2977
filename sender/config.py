"""Constants of the sender that are not settings. The sender's tunables (back-offs, the retry
budget, the sweeper's timings, the SMTP pool...) are ``settings.sender``
(:class:`mailgenius.settings.SenderSettings`, read once by ``load_settings`` from
``MAILGENIUS_SENDER_<NAME>`` and ``MAILGENIUS_SEND_RETRY_BUDGET``) and handed to the code that
uses them through the settings it is given."""

from __future__ import annotations

#: recipients per dramatiq message and per provider call (Resend's batch endpoint takes <= 100)
BATCH_SIZE = 100
