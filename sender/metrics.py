"""The sender's metrics (names from mailgenius.metrics), registered on the registry passed in.

Workers use the global registry (multiprocess mode, set up by ``mailgenius worker``); the API
process registers them on its own registry for the webhook events and cancellations it handles.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mailgenius import metrics as m

PROVIDERS = ("resend", "smtp")
#: bounded failure reasons (the label of email_send_failures_total)
#: (bounced: a hard bounce, the recipient's mailbox does not exist; smtputf8: a non-ASCII address
#: and a relay without SMTPUTF8; deferred: 4xx at RCPT until the retry budget ran out)
REASONS = ("rejected", "invalid_request", "auth", "rate_limited", "server_error", "timeout",
           "connection", "render_error", "suppressed", "bounced", "smtputf8", "deferred")
#: why a provider call failed as a whole (the label of provider_errors_total)
PROVIDER_ERROR_REASONS = ("server_error", "timeout", "connection", "rate_limited", "client_error")
EVENTS = ("delivered", "bounced", "complained", "opened", "clicked", "delivery_delayed")
OUTCOMES = ("sent", "failed", "cancelled")
#: why a campaign paused itself (sender/guardrails.py REASONS)
AUTO_PAUSE_REASONS = ("bounce_rate", "error_rate", "complaint_rate")
#: where a bounce or complaint report came from, and what became of it (sender/bounces.py)
REPORT_SOURCES = ("dsn", "arf", "webhook")
REPORT_OUTCOMES = ("applied", "duplicate", "unmatched", "invalid")

#: provider call latency: a Resend batch call takes 50 ms - 2 s; SMTP single messages ~ms
PROVIDER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: send -> delivered: seconds to hours
DELIVERY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class SenderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        kw = {"registry": registry} if registry is not None else {}
        self.sent = Counter(m.EMAILS_SENT[: -len("_total")], "Emails accepted by the provider.",
                            ["provider"], **kw)
        self.failures = Counter(m.EMAIL_SEND_FAILURES[: -len("_total")],
                                "Emails that could not be sent, by reason.", ["provider", "reason"], **kw)
        self.events = Counter(m.EMAIL_EVENTS[: -len("_total")],
                              "Delivery and engagement events received.", ["provider", "event"], **kw)
        self.provider_duration = Histogram(m.PROVIDER_REQUEST_DURATION, "Provider call duration.",
                                           ["provider", "operation"], buckets=PROVIDER_BUCKETS, **kw)
        self.delivery_latency = Histogram(m.EMAIL_DELIVERY_LATENCY, "From sent to delivered.",
                                          ["provider"], buckets=DELIVERY_BUCKETS, **kw)
        self.provider_errors = Counter(m.PROVIDER_ERRORS[: -len("_total")],
                                       "Failed provider calls (one per call, not per recipient), by reason.",
                                       ["provider", "reason"], **kw)
        self.campaigns_finished = Counter(m.CAMPAIGNS_FINISHED[: -len("_total")],
                                          "Campaigns finished, by outcome.", ["outcome"], **kw)
        # per process (multiprocess "livesum": the fleet's total per relay)
        self.smtp_connections = Gauge(m.SMTP_CONNECTIONS, "SMTP connections open to the relay.",
                                      ["provider", "relay"], multiprocess_mode="livesum", **kw)
        self.auto_paused = Counter(m.CAMPAIGNS_AUTO_PAUSED[: -len("_total")],
                                   "Campaigns paused by a guard-rail, by reason.", ["reason"], **kw)
        self.bounce_reports = Counter(m.BOUNCE_REPORTS[: -len("_total")],
                                      "Bounce and complaint reports read (mailbox DSN/ARF, signed webhook), by outcome.",
                                      ["source", "outcome"], **kw)
        for r in AUTO_PAUSE_REASONS:
            self.auto_paused.labels(r)
        for src in REPORT_SOURCES:
            for o in REPORT_OUTCOMES:
                self.bounce_reports.labels(src, o)
        for p in PROVIDERS:
            self.sent.labels(p)
            self.delivery_latency.labels(p)
            for r in REASONS:
                self.failures.labels(p, r)
            for r in PROVIDER_ERROR_REASONS:
                self.provider_errors.labels(p, r)
            for e in EVENTS:
                self.events.labels(p, e)
        for o in OUTCOMES:
            self.campaigns_finished.labels(o)
