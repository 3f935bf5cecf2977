"""Reading the capped log stream (:mod:`mailgenius.logstream`) with filters.

The stream holds at most ~``MAILGENIUS_LOG_STREAM_MAXLEN`` entries (10,000 by default), so a
filtered read scans at most that many, newest first; the live view then asks only for entries
after the last id it has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailgenius import errors
from mailgenius.logstream import FIELDS, stream_key

#: levels in the stream, lowest first; a filter on a level shows it and everything above
LEVELS = ("warning", "error", "critical")
#: services that write to the stream (others that show up are listed too)
KNOWN_SERVICES = ("sender", "importer", "exporter", "sender-worker", "importer-worker")
#: most entries one read scans (the stream's default cap)
SCAN_LIMIT = 10_000
#: entries fetched per round trip: small replies keep each one well inside the Redis timeout
CHUNK = 500
#: most entries one page read returns
MAX_LIMIT = 1_000
_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_SERVICE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class LogFilter:
    service: str = ""
    level: str = ""
    text: str = ""

    @classmethod
    def from_query(cls, query) -> LogFilter:
        """Validate the query string; a bad value is a 422 naming the parameter."""
        service = query.get("service", "").strip()
        level = query.get("level", "").strip().lower()
        text = query.get("q", "")
        if service and not _SERVICE.match(service):
            raise errors.ValidationError(f"service: not a service name: {service[:64]!r}")
        if level and level not in LEVELS:
            raise errors.ValidationError(f"level: must be one of {', '.join(LEVELS)}; got {level[:20]!r}")
        if len(text) > 200:
            raise errors.ValidationError("q: at most 200 characters")
        return cls(service, level, text.strip())

    def matches(self, entry: dict) -> bool:
        if self.service and entry.get("service") != self.service:
            return False
        if self.level and LEVELS.index(self.level) > _rank(entry.get("level", "")):
            return False
        if self.text:
            needle = self.text.lower()
            hay = " ".join((entry.get("message", ""), entry.get("logger", ""), entry.get("request_id", "")))
            if needle not in hay.lower():
                return False
        return True


def _rank(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else -1


def parse_after(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if not _ID.match(raw):
        raise errors.ValidationError(f"after: not a stream id: {raw[:40]!r}")
    return raw


def parse_limit(raw: str | None, default: int = 200) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.ValidationError(f"limit: expected an integer, got {raw[:20]!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise errors.ValidationError(f"limit: must be between 1 and {MAX_LIMIT}")
    return value


_FIELD_KEYS = tuple((f, f.encode()) for f in FIELDS)


def _entry(entry_id, fields) -> dict:
    out = {"id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id}
    for name, raw_name in _FIELD_KEYS:
        v = fields.get(raw_name, fields.get(name, b""))
        out[name] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return out


async def read_logs(redis, prefix: str, flt: LogFilter, *, after: str | None = None,
                    limit: int = 200) -> tuple[list[dict], str | None]:
    """Matching entries, oldest first, and the newest stream id seen (to poll from).

    Without ``after``: the ``limit`` newest matches, reading the stream backwards in chunks of
    :data:`CHUNK` and stopping as soon as there are enough (or :data:`SCAN_LIMIT` were read).
    With ``after``: the matches written since that id (at most ``limit``, the oldest first, so
    nothing is skipped when more arrived).
    """
    key = stream_key(prefix)
    picked: list[dict] = []
    scanned = 0
    if after is None:
        newest = None
        end = "+"
        while scanned < SCAN_LIMIT and len(picked) < limit:
            raw = await redis.xrevrange(key, end, "-", count=CHUNK)
            if not raw:
                break
            for entry_id, fields in raw:
                e = _entry(entry_id, fields)
                newest = newest or e["id"]
                if flt.matches(e):
                    picked.append(e)
                    if len(picked) >= limit:
                        break
            scanned += len(raw)
            if len(raw) < CHUNK:
                break
            last_id = raw[-1][0]
            end = "(" + (last_id.decode() if isinstance(last_id, bytes) else last_id)
        picked.reverse()
        return picked, newest
    last = after
    while scanned < SCAN_LIMIT:
        raw = await redis.xrange(key, f"({last}", "+", count=CHUNK)
        if not raw:
            break
        for entry_id, fields in raw:
            e = _entry(entry_id, fields)
            if flt.matches(e):
                if len(picked) >= limit:
                    return picked, last
                picked.append(e)
            last = e["id"]
        scanned += len(raw)
        if len(raw) < CHUNK:
            break
    return picked, last
