"""The words of an import's ``imports.status``, shared by the importer (which moves imports
between them: ``importer/jobs.py`` owns the state machine) and the exporter (which counts them).

Only the vocabulary lives here, on the kernel floor, because services never import each other;
the transitions and every statement that changes a status stay in ``importer/jobs.py``. The
words match the CHECK constraint of ``imports.status`` (migrations/0001_initial.sql), and the
partial index ``imports_status_idx`` covers exactly :data:`ACTIVE`.

SQL that filters on statuses spells them through :func:`sql_list` (``status IN ('queued',
'running')``) rather than a ``= ANY($1)`` parameter: Postgres uses a partial index only when the
query's own literal predicate implies the index's, which a parameter never does in a generic plan.
A test (tests/test_import_states.py) fails when a status word is spelled as a literal anywhere
else in importer/ or in the exporter's import code.
"""

from __future__ import annotations

import datetime as dt

QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

#: every status, in lifecycle order
STATUSES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
#: an import in one of these still needs its upload file and may still change
ACTIVE = (QUEUED, RUNNING)
#: terminal: nothing moves an import out of these
FINISHED = (COMPLETED, FAILED, CANCELLED)


def sql_list(statuses: tuple[str, ...]) -> str:
    """``('queued', 'running')``: a literal SQL list of status words, for ``status IN ...``."""
    for s in statuses:
        if s not in STATUSES:
            raise ValueError(f"not an import status: {s!r}")
    return "(" + ", ".join(f"'{s}'" for s in statuses) + ")"


def progress(status: str, processed: int, total: int | None, started_at: dt.datetime | None,
             finished_at: dt.datetime | None, now: dt.datetime) -> dict:
    """How far an import is: ``rows_per_second`` (processed rows over the time since it started,
    up to its end; None before it starts), ``eta_seconds`` (a running import's rows left at that
    rate; 0 once finished; None while unknown) and ``progress_percent``.

    One computation for the importer's API (``GET /api/imports/{id}``) and the monitoring page,
    so the two screens never show two figures for one import.
    """
    rps = eta = None
    if started_at is not None:
        elapsed = max(((finished_at or now) - started_at).total_seconds(), 1e-3)
        rps = round(processed / elapsed, 1)
    if status == RUNNING:
        if rps and total is not None:
            eta = round(max(total - processed, 0) / rps, 1)
    elif status in FINISHED:
        eta = 0.0
    percent = (round(min(100.0, 100.0 * processed / total), 1) if total
               else (100.0 if status == COMPLETED else 0.0))
    return {"rows_per_second": rps, "eta_seconds": eta, "progress_percent": percent}
