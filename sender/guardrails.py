"""Campaign guard-rails: the outcome of a finished campaign by its failed share, and the
auto-pause of a sending campaign whose bounce, error or complaint rate crosses a limit.

The numbers live in ``alerting/rules.yml`` (``thresholds:``), the one source of every number an
alert compares with; this module reads them from there, so the campaign that pauses itself and
the alerts that watch the same ratios cannot drift apart:

* ``campaign_failed_share``: a finished campaign whose failed / recipients is above it (``failed``
  counts every recipient refused at send time, synchronous hard bounces included) finishes
  ``failed`` (and counts so in ``mailgenius_campaigns_finished_total{outcome}``,
  which CampaignFailureRateHigh watches);
* ``campaign_pause_min_recipients``: no guard-rail judges a campaign before this many of its
  recipients were attempted (sent + failed), so three early bounces never stop a big send;
* ``campaign_pause_bounce_ratio`` (bounced / attempted, pauses when above),
  ``campaign_pause_error_ratio`` (failed / attempted, above),
  ``campaign_pause_complaint_ratio`` (complained / sent, at or above: the 2024 Gmail/Yahoo
  bulk-sender limit of 0.3 %; ComplaintRateHigh warns at 0.1 %).

A pause is one conditional UPDATE of the campaign row (status ``sending`` -> ``paused`` with
``pause_reason``), run right after the counters changed (in the event's transaction; after the
send path's record statement), so two workers crossing the threshold at once pause it once.
Resume (the existing endpoint) is explicit: it clears the reason and stores the counters at that
moment (``guard_base``), so the guard-rails then judge only the recipients since the resume (again
with the minimum sample): the same old figures do not pause it again at the next batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

#: alerting/rules.yml, read as data (sender never imports the alerting package)
RULES_PATH = Path(__file__).resolve().parent.parent / "alerting" / "rules.yml"
#: the reasons a campaign pauses itself (the label of mailgenius_campaigns_auto_paused_total)
REASONS = ("bounce_rate", "error_rate", "complaint_rate")


@dataclass(frozen=True)
class Thresholds:
    failed_share: float
    min_recipients: int
    bounce_ratio: float
    error_ratio: float
    complaint_ratio: float


def load_thresholds(path: Path = RULES_PATH) -> Thresholds:
    """The guard-rail numbers of ``alerting/rules.yml``; a missing one is an error."""
    t = yaml.safe_load(path.read_text())["thresholds"]
    try:
        return Thresholds(
            failed_share=float(t["campaign_failed_share"]),
            min_recipients=int(t["campaign_pause_min_recipients"]),
            bounce_ratio=float(t["campaign_pause_bounce_ratio"]),
            error_ratio=float(t["campaign_pause_error_ratio"]),
            complaint_ratio=float(t["campaign_pause_complaint_ratio"]),
        )
    except KeyError as exc:
        raise RuntimeError(f"{path}: thresholds.{exc.args[0]} is missing") from None


#: read when the sender starts (API and workers import this module): a rules.yml without these
#: numbers stops the service at once rather than the first campaign that needs them
_THRESHOLDS = load_thresholds()


def thresholds() -> Thresholds:
    return _THRESHOLDS


#: a finished campaign (the send path just moved it to sent/failed) takes its outcome by ratio;
#: returns the final status
SETTLE_SQL = """
UPDATE campaigns SET status = CASE
        WHEN sent = 0 AND failed > 0 THEN 'failed'
        WHEN recipients > 0 AND failed::float8 / recipients > $2 THEN 'failed'
        ELSE 'sent' END,
    updated_at = now()
WHERE id = $1 AND status IN ('sent', 'failed')
RETURNING status
"""

#: pause a sending campaign whose rates cross a guard-rail; returns the reason when it paused.
#: Counted since the last explicit resume (``guard_base``: sent, failed, bounced, complained then);
#: ``attempted`` = sent + failed (recipients whose send is decided); complaints are per sent.
PAUSE_SQL = """
WITH c AS (
    SELECT id, sent - guard_base[1] AS sent, failed - guard_base[2] AS failed,
           bounced - guard_base[3] AS bounced, complained - guard_base[4] AS complained
    FROM campaigns WHERE id = $1 AND status = 'sending' FOR UPDATE),
d AS (SELECT id, greatest(sent, 0) AS sent, greatest(failed, 0) AS failed, greatest(bounced, 0) AS bounced,
             greatest(complained, 0) AS complained, greatest(sent, 0) + greatest(failed, 0) AS attempted FROM c),
why AS (
    SELECT id, CASE
        WHEN attempted < $2 OR attempted = 0 THEN NULL
        WHEN sent > 0 AND complained::float8 / sent >= $5 THEN
            'complaint_rate: ' || complained || ' complaints of ' || sent || ' sent ('
            || round(100.0 * complained / sent, 2) || ' %) >= ' || round(100 * $5::numeric, 2) || ' %'
        WHEN bounced::float8 / attempted > $3 THEN
            'bounce_rate: ' || bounced || ' bounced of ' || attempted || ' attempted ('
            || round(100.0 * bounced / attempted, 2) || ' %) > ' || round(100 * $3::numeric, 2) || ' %'
        WHEN failed::float8 / attempted > $4 THEN
            'error_rate: ' || failed || ' failed of ' || attempted || ' attempted ('
            || round(100.0 * failed / attempted, 2) || ' %) > ' || round(100 * $4::numeric, 2) || ' %'
        END AS reason
    FROM d)
UPDATE campaigns k SET status = 'paused', pause_reason = why.reason, auto_paused_at = now(), updated_at = now()
FROM why WHERE k.id = why.id AND why.reason IS NOT NULL
RETURNING why.reason
"""


def reason_label(reason: str) -> str:
    """The bounded label of a stored reason (its text before the colon)."""
    label = reason.split(":", 1)[0]
    return label if label in REASONS else "other"


async def check(conn, campaign_id: int, metrics=None, t: Thresholds | None = None) -> str | None:
    """Pause ``campaign_id`` when it crosses a guard-rail (call inside the transaction that
    changed its counters). Returns the reason when this call paused it."""
    t = t or thresholds()
    reason = await conn.fetchval(PAUSE_SQL, campaign_id, t.min_recipients, t.bounce_ratio, t.error_ratio,
                                 t.complaint_ratio)
    if reason is not None:
        log.warning("campaign auto-paused", extra={"campaign_id": campaign_id, "reason": reason})
        if metrics is not None:
            metrics.auto_paused.labels(reason_label(reason)).inc()
    return reason


async def after_record(conn, campaign_id: int | None, finished: str | None, metrics=None) -> str | None:
    """The send path's hook after it recorded a round of outcomes: a campaign that just finished
    takes its outcome by ratio (returned: the status to count), one still sending is checked
    against the guard-rails (returns None)."""
    if campaign_id is None:
        return finished
    t = thresholds()
    if finished is not None:
        return await conn.fetchval(SETTLE_SQL, campaign_id, t.failed_share) or finished
    await check(conn, campaign_id, metrics, t)
    return None
