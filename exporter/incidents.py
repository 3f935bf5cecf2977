"""Incidents from Alertmanager's webhook (payload version 4).

One incident per alert *episode*: Alertmanager gives every firing episode of an alert a
``fingerprint`` (its label set) and a ``startsAt``; the pair is the incident's identity
(``UNIQUE (fingerprint, started_at)``), so a notification delivered twice, or repeated every
``repeat_interval``, never makes a second incident. A ``resolved`` notification closes the incident
at ``endsAt``; one that arrives for an episode we never saw (the exporter was down when it fired)
is recorded directly as resolved, so MTTR stays right. A late ``firing`` retry never reopens a
resolved incident. Alerts named in ``ignored_alerts`` (the always-firing Watchdog) are skipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from mailgenius import errors
from mailgenius.settings import MIN_WEBHOOK_TOKEN_CHARS

#: Alertmanager's "no end time" value for firing alerts
_ZERO_TIME = "0001-01-01T00:00:00Z"
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
#: longest label value we keep in the severity / service / alertname columns
MAX_LABEL = 200
MAX_ALERTS = 1000
#: severities kept as they are; anything else is stored (and exported in
#: ``mailgenius_incidents_open{severity}``) as ``other``, so a caller cannot grow the label set
KNOWN_SEVERITIES = frozenset({"critical", "warning", "info", "none"})
#: the shortest webhook token accepted (checked at start-up by mailgenius.settings)
MIN_TOKEN_CHARS = MIN_WEBHOOK_TOKEN_CHARS


def check_webhook_token(authorization: str, token: str) -> None:
    """The webhook is Alertmanager's alone: it needs ``Authorization: Bearer <token>`` (the
    rendered configs send it from ``secrets/alert_webhook_token``). With no token configured on
    the exporter the webhook is refused (403), never open: a forged notification could open
    incidents, and a replayed fingerprint could resolve a real one."""
    if not token:
        raise errors.Forbidden("the alert webhook is disabled: set MAILGENIUS_ALERT_WEBHOOK_TOKEN on the "
                               "exporter (`make run` generates one) and give Alertmanager the same value",
                               code="webhook_disabled")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise errors.Unauthorized("this webhook needs 'Authorization: Bearer <MAILGENIUS_ALERT_WEBHOOK_TOKEN>'")


def severity_of(labels: dict) -> str:
    """The alert's severity when it is one we know, else ``other`` (bounded label values)."""
    severity = (labels.get("severity") or "warning").strip().lower()
    return severity if severity in KNOWN_SEVERITIES else "other"

WEBHOOK_SCHEMA = {
    "type": "object",
    "required": ["alerts"],
    "properties": {
        "version": {"type": "string"},
        "status": {"type": "string", "enum": ["firing", "resolved"]},
        "receiver": {"type": "string"},
        "groupKey": {"type": "string"},
        "alerts": {
            "type": "array",
            "maxItems": MAX_ALERTS,
            "items": {
                "type": "object",
                "required": ["status", "labels", "startsAt"],
                "properties": {
                    "status": {"type": "string", "enum": ["firing", "resolved"]},
                    "labels": {"type": "object", "required": ["alertname"],
                               "properties": {"alertname": {"type": "string", "minLength": 1}},
                               "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                    "startsAt": {"type": "string", "format": "date-time"},
                    "endsAt": {"type": "string"},
                    "fingerprint": {"type": "string", "maxLength": MAX_LABEL},
                    "generatorURL": {"type": "string"},
                },
            },
        },
    },
}

WEBHOOK_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["received", "opened", "resolved", "unchanged", "ignored"],
    "properties": {k: {"type": "integer"} for k in ("received", "opened", "resolved", "unchanged", "ignored")},
}

INCIDENT_SCHEMA = {
    "type": "object",
    "required": ["id", "fingerprint", "alertname", "severity", "status", "started_at"],
    "properties": {
        "id": {"type": "integer"},
        "fingerprint": {"type": "string"},
        "alertname": {"type": "string"},
        "severity": {"type": "string"},
        "service": {"type": "string", "nullable": True},
        "summary": {"type": "string", "nullable": True},
        "description": {"type": "string", "nullable": True},
        "labels": {"type": "object"},
        "status": {"type": "string", "enum": ["open", "resolved"]},
        "started_at": {"type": "string", "format": "date-time"},
        "resolved_at": {"type": "string", "nullable": True, "format": "date-time"},
        "duration_seconds": {"type": "number", "description": "until resolution, or until now when open"},
    },
}

INCIDENTS_RESPONSE_SCHEMA = {
    "type": "object",
    "required": ["incidents", "open", "mttr_seconds", "mtbf_seconds"],
    "properties": {
        "incidents": {"type": "array", "items": INCIDENT_SCHEMA},
        "open": {"type": "object", "description": "open incidents by severity",
                 "additionalProperties": {"type": "integer"}},
        "mttr_seconds": {"type": "number", "nullable": True, "description": "mean time to resolve, 30-day window"},
        "mtbf_seconds": {"type": "number", "nullable": True, "description": "mean time between incident starts, 30-day window"},
    },
}


def parse_time(value: Any, field: str) -> dt.datetime | None:
    """An RFC 3339 time as Alertmanager writes it (up to nanoseconds); None for the zero time."""
    if not isinstance(value, str):
        raise errors.ValidationError(f"{field} must be an RFC 3339 time string")
    if value in ("", _ZERO_TIME) or value.startswith("0001-01-01"):
        return None
    mt = _RFC3339.match(value.strip())
    if not mt:
        raise errors.ValidationError(f"{field} is not an RFC 3339 time: {value[:60]!r}")
    date, clock, frac, tz = mt.groups()
    frac = (frac or ".0")[:7]  # microseconds at most
    tz = "+00:00" if tz in ("Z", "z") else tz
    try:
        return dt.datetime.fromisoformat(f"{date}T{clock}{frac}{tz}")
    except ValueError as exc:
        raise errors.ValidationError(f"{field} is not a valid time: {exc}") from None


@dataclass
class AlertEvent:
    status: str
    fingerprint: str
    alertname: str
    severity: str
    service: str | None
    summary: str | None
    description: str | None
    labels: dict
    starts_at: dt.datetime
    ends_at: dt.datetime | None


def _fingerprint(labels: dict) -> str:
    """Alertmanager always sends one; for hand-made payloads, a stable hash of the labels."""
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def parse_payload(body: Any) -> list[AlertEvent]:
    if not isinstance(body, dict):
        raise errors.ValidationError("the webhook body must be a JSON object with an 'alerts' list")
    alerts = body.get("alerts")
    if not isinstance(alerts, list):
        raise errors.ValidationError("'alerts' must be a list of alerts (Alertmanager webhook v4)")
    if len(alerts) > MAX_ALERTS:
        raise errors.ValidationError(f"at most {MAX_ALERTS} alerts per notification")
    out = []
    for i, a in enumerate(alerts):
        where = f"alerts[{i}]"
        if not isinstance(a, dict):
            raise errors.ValidationError(f"{where} must be an object")
        status = a.get("status")
        if status not in ("firing", "resolved"):
            raise errors.ValidationError(f"{where}.status must be 'firing' or 'resolved'")
        labels = a.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise errors.ValidationError(f"{where}.labels must be an object of strings")
        alertname = labels.get("alertname", "")
        if not alertname:
            raise errors.ValidationError(f"{where}.labels.alertname is required")
        annotations = a.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise errors.ValidationError(f"{where}.annotations must be an object")
        starts_at = parse_time(a.get("startsAt"), f"{where}.startsAt")
        if starts_at is None:
            raise errors.ValidationError(f"{where}.startsAt is required")
        ends_at = parse_time(a.get("endsAt", _ZERO_TIME) or _ZERO_TIME, f"{where}.endsAt")
        fp = a.get("fingerprint") or _fingerprint(labels)
        if not isinstance(fp, str) or len(fp) > MAX_LABEL:
            raise errors.ValidationError(f"{where}.fingerprint must be a short string")
        summary = annotations.get("summary")
        description = annotations.get("description")
        out.append(AlertEvent(
            status=status,
            fingerprint=fp,
            alertname=alertname[:MAX_LABEL],
            severity=severity_of(labels),
            service=(labels.get("service") or labels.get("job") or None),
            summary=str(summary) if summary is not None else None,
            description=str(description) if description is not None else None,
            labels=labels,
            starts_at=starts_at,
            ends_at=ends_at,
        ))
    return out


async def record_alerts(pool, events: list[AlertEvent], *, ignored: tuple[str, ...] = ()) -> dict:
    """Apply one notification; idempotent. Returns counts of what changed."""
    counts = {"received": len(events), "opened": 0, "resolved": 0, "unchanged": 0, "ignored": 0}
    async with pool.acquire() as conn, conn.transaction():
        for ev in events:
            if ev.alertname in ignored:
                counts["ignored"] += 1
                continue
            args = (ev.fingerprint, ev.alertname, ev.severity, ev.service, ev.summary,
                    ev.description, json.dumps(ev.labels), ev.starts_at)
            if ev.status == "firing":
                row = await conn.fetchrow(
                    """INSERT INTO incidents (fingerprint, alertname, severity, service, summary,
                                              description, labels, status, started_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, 'open', $8)
                       ON CONFLICT (fingerprint, started_at) DO UPDATE
                          SET summary = excluded.summary, description = excluded.description,
                              updated_at = now()
                       RETURNING (xmax = 0) AS inserted""",
                    *args,
                )
                counts["opened" if row["inserted"] else "unchanged"] += 1
            else:
                # resolved at endsAt; never before it started; now() when Alertmanager gave none
                row = await conn.fetchrow(
                    """INSERT INTO incidents AS i (fingerprint, alertname, severity, service, summary,
                                                   description, labels, status, started_at, resolved_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, 'resolved', $8,
                               greatest($8, coalesce($9, now())))
                       ON CONFLICT (fingerprint, started_at) DO UPDATE
                          SET status = 'resolved',
                              resolved_at = coalesce(i.resolved_at, excluded.resolved_at),
                              updated_at = now()
                        WHERE i.status = 'open'
                       RETURNING id""",
                    *args, ev.ends_at,
                )
                counts["resolved" if row else "unchanged"] += 1
    return counts


def incident_dict(r) -> dict:
    now = dt.datetime.now(dt.UTC)
    end = r["resolved_at"] or now
    labels = r["labels"]
    if isinstance(labels, str):
        labels = json.loads(labels)
    return {
        "id": r["id"], "fingerprint": r["fingerprint"], "alertname": r["alertname"],
        "severity": r["severity"], "service": r["service"], "summary": r["summary"],
        "description": r["description"], "labels": labels, "status": r["status"],
        "started_at": r["started_at"], "resolved_at": r["resolved_at"],
        "duration_seconds": round(max(0.0, (end - r["started_at"]).total_seconds()), 3),
    }


async def list_incidents(pool, *, status: str | None, severity: str | None, limit: int) -> list[dict]:
    rows = await pool.fetch(
        """SELECT id, fingerprint, alertname, severity, service, summary, description, labels,
                  status, started_at, resolved_at
             FROM incidents
            WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR severity = $2)
            ORDER BY started_at DESC, id DESC
            LIMIT $3""",
        status, severity, limit,
    )
    return [incident_dict(r) for r in rows]
