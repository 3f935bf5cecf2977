"""Imports in progress (and the last few finished), straight from the ``imports`` table.

The importer keeps ``processed_rows`` and the counts up to date after each committed batch, so
rows/s and the ETA follow from them; the query reads at most :data:`RECENT` rows by index.
"""

from __future__ import annotations

import json

from mailgenius.import_states import ACTIVE, progress, sql_list

#: finished imports listed below the running ones
RECENT = 5

_ACTIVE_SQL = f"""
SELECT id, status, filename, bytes, total_rows, processed_rows, inserted, updated, duplicates,
       invalid, error, created_at, started_at, finished_at, mapping, now() AS now
FROM imports WHERE status IN {sql_list(ACTIVE)} ORDER BY id DESC LIMIT 20
"""
_RECENT_SQL = f"""
SELECT id, status, filename, bytes, total_rows, processed_rows, inserted, updated, duplicates,
       invalid, error, created_at, started_at, finished_at, mapping, now() AS now
FROM imports WHERE status NOT IN {sql_list(ACTIVE)} ORDER BY created_at DESC LIMIT $1
"""


def mapping_summary(mapping: list[dict] | None) -> str | None:
    """``E-mail → email, Nome → first_name, … (+2 in attributes, 1 ignored)`` from the mapping
    the importer recorded (one {"column", "field"} per header column); None before it ran."""
    if not mapping:
        return None
    mapped = [f"{m['column']} → {m['field']}" for m in mapping if m.get("field") not in ("attribute", "ignore")]
    extra = sum(1 for m in mapping if m.get("field") == "attribute")
    ignored = sum(1 for m in mapping if m.get("field") == "ignore")
    tail = [f"+{extra} in attributes"] if extra else []
    tail += [f"{ignored} ignored"] if ignored else []
    return ", ".join(mapped) + (f" ({', '.join(tail)})" if tail else "")


def _row(r) -> dict:
    processed = int(r["processed_rows"] or 0)
    total = r["total_rows"]
    mapping = json.loads(r["mapping"]) if isinstance(r["mapping"], str) else r["mapping"]
    # rate, ETA and percent as the importer's API computes them (one figure on both screens)
    figures = progress(r["status"], processed, total, r["started_at"], r["finished_at"], r["now"])
    return {
        "id": r["id"], "status": r["status"], "filename": r["filename"], "bytes": r["bytes"],
        "total_rows": total, "processed_rows": processed, "inserted": r["inserted"],
        "updated": r["updated"], "duplicates": r["duplicates"], "invalid": r["invalid"],
        "error": r["error"], **figures,
        "progress": figures["progress_percent"] / 100.0,
        "created_at": r["created_at"], "finished_at": r["finished_at"],
        "mapping": mapping, "mapping_summary": mapping_summary(mapping),
    }


async def import_overview(pool) -> dict:
    async with pool.acquire() as conn:
        active = await conn.fetch(_ACTIVE_SQL)
        recent = await conn.fetch(_RECENT_SQL, RECENT)
    return {"active": [_row(r) for r in active], "recent": [_row(r) for r in recent]}
