"""3. Email Metrics: delivery statistics, engagement, provider performance, campaign analytics
and real-time throughput."""

from dashboards.helpers import (
    CONTRACT,
    RECEIPTS_SELECTOR,
    Section,
    alerts_annotation,
    bargauge,
    build_dashboard,
    campaign_var,
    fires,
    high_bad,
    increase,
    low_bad,
    panel_link,
    prom,
    provider_var,
    quantile,
    rate,
    ratio,
    recorded,
    stat,
    table,
    threshold,
    timeseries,
)
from mailgenius import metrics as M

P = 'provider=~"$provider"'
CONTRACT_REFUSED = CONTRACT.selector("refused")


def event(name: str) -> str:
    return f'{P},event="{name}"'


sent_range = increase(M.EMAILS_SENT, P)
#: provider-aware: delivered over the sends of providers with delivery receipts only (an SMTP
#: relay gives none: over it the rate is empty, not 0 %)
sent_receipts_range = increase(M.EMAILS_SENT, f"{P},{RECEIPTS_SELECTOR}")
delivered_range = increase(M.EMAIL_EVENTS, f'{event("delivered")},{RECEIPTS_SELECTOR}')
#: bounces every provider can tell: refusals at submission (SMTP 5xx at RCPT/DATA) + receipts
refused_range = increase(M.EMAIL_SEND_FAILURES, f'{P},{CONTRACT_REFUSED}')

sent_stat = stat("Sent (range)", [prom(sent_range)], decimals=0, graph=True)
sent_per_hour = stat(
    "Sent per hour", [prom(rate(M.EMAILS_SENT, P, "", "1h") + " * 3600")], decimals=0,
    description="Emails accepted by the provider over the last hour.",
)
delivery_rate = stat(
    "Delivery rate (range)", [prom(f"({delivered_range}) / (({sent_receipts_range}) > 0)")], unit="percentunit",
    decimals=1, thresholds=low_bad(min(1.0, threshold("email_delivery_ratio") + 0.02), threshold("email_delivery_ratio")),
    description="Providers with delivery receipts only (empty over SMTP: unknown, not 0). "
                + fires("EmailDeliveryRateLow", "below", "email_delivery_ratio"),
)
bounce_rate = stat(
    "Bounce rate (range)",
    [prom(f"(({increase(M.EMAIL_EVENTS, event('bounced'))} or vector(0)) + ({refused_range} or vector(0)))"
          f" / (({sent_range}) + ({refused_range} or vector(0)))")],
    unit="percentunit", decimals=2,
    thresholds=high_bad(threshold("email_bounce_ratio") * 0.6, threshold("email_bounce_ratio")),
    description="Refused at submission + bounce receipts, over all submitted. "
                + fires("BounceRateHigh", "above", "email_bounce_ratio"),
)
complaint_rate = stat(
    "Complaint rate (range)",
    [prom(f"({increase(M.EMAIL_EVENTS, event('complained') + ',' + RECEIPTS_SELECTOR)}) / (({sent_receipts_range}) > 0)")],
    unit="percentunit", decimals=3,
    thresholds=high_bad(threshold("email_complaint_ratio"), threshold("email_complaint_ratio") * 3),
    description="Providers with delivery receipts only. " + fires("ComplaintRateHigh", "above", "email_complaint_ratio"),
)
failures_stat = stat(
    "Send failures (range)", [prom(f"{increase(M.EMAIL_SEND_FAILURES, P)} or vector(0)")], decimals=0,
    thresholds=[(None, "green"), (1, "orange")],
)
events_ts = timeseries(
    "Delivery events per second", [prom(rate(M.EMAIL_EVENTS, P, "event"), "{{event}}")], unit="ops",
    description="Provider webhook events (delivered, bounced, complained, delivery_delayed) and tracking.",
)
delivery_ratio_ts = timeseries(
    "Delivery and bounce ratios",
    [prom(recorded("email_delivery_ratio", P), "{{provider}} delivered / sent"),
     prom(recorded("email_bounce_ratio", P), "{{provider}} bounced / submitted")],
    unit="percentunit", thresholds=[(None, "green"), (threshold("email_delivery_ratio"), "red")],
    description="The alerts' recorded series (last hour, per provider).",
)

open_rate = stat(
    "Open rate (range)",
    [prom(f"({increase(M.EMAIL_EVENTS, event('opened'))} or vector(0)) / ({sent_range})")],
    unit="percentunit", decimals=1, description="Opens seen by our tracking pixel / emails accepted (every provider).",
)
click_rate = stat(
    "Click rate (range)",
    [prom(f"({increase(M.EMAIL_EVENTS, event('clicked'))} or vector(0)) / ({sent_range})")],
    unit="percentunit", decimals=1, description="Clicks through our redirects / emails accepted (every provider).",
)
engagement_ts = timeseries(
    "Opens and clicks per minute",
    [prom(rate(M.EMAIL_EVENTS, event("opened"), "", "5m") + " * 60", "opens"),
     prom(rate(M.EMAIL_EVENTS, event("clicked"), "", "5m") + " * 60", "clicks")],
)
unsubscribes = stat(
    "Unsubscribed leads", [prom(f'sum({M.LEADS}{{status="unsubscribed"}})')], decimals=0,
    description="Leads that used the one-click unsubscribe link.",
)

provider_latency = timeseries(
    "Provider request latency p95",
    [prom(quantile(0.95, M.PROVIDER_REQUEST_DURATION, P, "provider, operation"), "{{provider}} {{operation}}")],
    unit="s",
)
delivery_latency = timeseries(
    "Delivery latency p50 / p95 (sent → delivered)",
    [prom(quantile(0.5, M.EMAIL_DELIVERY_LATENCY, P, "provider", "$__range"), "{{provider}} p50"),
     prom(quantile(0.95, M.EMAIL_DELIVERY_LATENCY, P, "provider", "$__range"), "{{provider}} p95")],
    unit="s",
)
provider_table = table(
    "Provider performance (range)",
    [prom(increase(M.EMAILS_SENT, P, "provider"), instant=True, fmt="table"),
     prom(f"{increase(M.EMAIL_EVENTS, event('delivered') + ',' + RECEIPTS_SELECTOR, 'provider')}"
          f" / ({increase(M.EMAILS_SENT, P + ',' + RECEIPTS_SELECTOR, 'provider')} > 0)", instant=True, fmt="table")],
    description="Value #A: sent; Value #B: delivery rate (providers with delivery receipts only: "
                "no value for SMTP, which cannot know it).",
)
failures_ts = timeseries(
    "Send failures by reason",
    [prom(f"{rate(M.EMAIL_SEND_FAILURES, P, 'provider, reason')}", "{{provider}} {{reason}}")],
    unit="ops", bars=True,
)
provider_errors_ts = timeseries(
    "Provider errors by reason (failed calls/s)",
    [prom(rate(M.PROVIDER_ERRORS, P, "provider, reason"), "{{provider}} {{reason}}")],
    unit="ops", bars=True,
    description="Failed provider calls (one per call, not per recipient): server_error, timeout, connection, "
                "rate_limited, client_error. EmailProviderFailing fires when over half the calls fail for "
                "5 minutes; the failed recipients are retried, not lost.",
    links=[panel_link("alerts-incidents")],
)

campaigns_state = bargauge(
    "Campaigns by status", [prom(f"sum by (status) ({M.CAMPAIGNS})", "{{status}}", instant=True)],
)
campaigns_finished = stat(
    "Campaigns finished (range)", [prom(increase(M.CAMPAIGNS_FINISHED, "", "outcome"), "{{outcome}}")],
    text_mode="value_and_name", decimals=0,
)
campaign_failure = stat(
    "Campaign failure rate (range)",
    [prom(ratio(increase(M.CAMPAIGNS_FINISHED, 'outcome="failed"'), increase(M.CAMPAIGNS_FINISHED)))],
    unit="percentunit", thresholds=high_bad(threshold("campaign_failure_ratio") / 2, threshold("campaign_failure_ratio")),
    description=fires("CampaignFailureRateHigh", "above", "campaign_failure_ratio"),
)
campaign_messages = table(
    "Recent campaigns: messages by status",
    [prom(f'sum by (campaign, status) ({M.CAMPAIGN_MESSAGES}{{campaign=~"$campaign"}})', instant=True, fmt="table")],
    description="Recent campaigns only (the exporter bounds the label set).",
    links=[panel_link("queue-health")],
)
campaign_progress = timeseries(
    "Campaign progress", [prom(f'sum by (campaign, status) ({M.CAMPAIGN_MESSAGES}{{campaign=~"$campaign"}})',
                               "{{campaign}} {{status}}")],
)

throughput = timeseries(
    "Real-time throughput (emails/s)",
    [prom(rate(M.EMAILS_SENT, P, "provider", "1m"), "{{provider}} sent"),
     prom(rate(M.EMAIL_SEND_FAILURES, P, "provider", "1m"), "{{provider}} failed")],
    unit="ops",
)
throughput_now = stat(
    "Emails/s now", [prom(rate(M.EMAILS_SENT, P, "", "1m"))], decimals=1, graph=True,
)
email_queue = stat(
    "Email queue waiting", [prom(f'sum({M.QUEUE_MESSAGES}{{queue="{M.QUEUE_EMAIL}",state="waiting"}})')],
    thresholds=[(None, "green"), (threshold("queue_waiting_messages") / 2, "orange"),
                (threshold("queue_waiting_messages"), "red")], links=[panel_link("queue-health")],
)

dashboard = build_dashboard(
    "email-metrics",
    "Email delivery: statistics, engagement, provider performance, campaigns and live throughput.",
    [
        Section("Delivery Statistics", [(sent_stat, 4, 5), (sent_per_hour, 4, 5), (delivery_rate, 4, 5),
                                        (bounce_rate, 4, 5), (complaint_rate, 4, 5), (failures_stat, 4, 5),
                                        (events_ts, 12, 7), (delivery_ratio_ts, 12, 7)],
                guide=("Delivery Statistics",)),
        Section("Engagement Metrics", [(open_rate, 4, 6), (click_rate, 4, 6), (unsubscribes, 4, 6),
                                       (engagement_ts, 12, 6)], guide=("Engagement Metrics",)),
        Section("Provider Performance", [(provider_latency, 8, 7), (delivery_latency, 8, 7),
                                         (provider_table, 8, 7), (failures_ts, 24, 6),
                                         (provider_errors_ts, 24, 6)],
                guide=("Provider Performance",)),
        Section("Campaign Analytics", [(campaigns_state, 8, 7), (campaigns_finished, 8, 7),
                                       (campaign_failure, 8, 7), (campaign_messages, 12, 8),
                                       (campaign_progress, 12, 8)], guide=("Campaign Analytics",)),
        Section("Real-time Throughput", [(throughput_now, 4, 7), (email_queue, 4, 7), (throughput, 16, 7)],
                guide=("Real-time Throughput",)),
    ],
    variables=[provider_var(), campaign_var()],
    annotations=[alerts_annotation()],
)
