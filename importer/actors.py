"""dramatiq actors of the importer: ``import_leads`` on queue ``lead-import``.

Run with ``mailgenius worker importer``. Delivery is at-least-once: a redelivered message
(worker killed, retry) resumes the import from its last committed batch (see loader.py).
"""

from __future__ import annotations

import logging
import sys

import dramatiq

from mailgenius.metrics import QUEUE_IMPORT
from mailgenius.worker import resources, worker_setup

from . import jobs
from .loader import ImportMetrics, ImportOptions, run_import

settings, broker = worker_setup("importer")
#: seconds a thread may hold the GIL before another waiting thread gets it. The loader parses
#: the next batch in a thread while the event loop streams the current one to Postgres; at
#: Python's default 5 ms every COPY flow-control resume and every round trip of the loop waited
#: out the parser's slice (COPY of a 500,000-row file: 1.4 s at 5 ms, 0.8-1.0 s at 0.2 ms)
GIL_SWITCH_INTERVAL = 0.0005
sys.setswitchinterval(GIL_SWITCH_INTERVAL)

log = logging.getLogger(__name__)
METRICS = ImportMetrics()
#: retries of a job that raised (each resumes from the checkpoint)
MAX_RETRIES = 5
#: 6 hours: far beyond a 2M-row import (~20 s); dramatiq's default 10 minutes could cut a
#: legitimately huge import in half
TIME_LIMIT_MS = 6 * 3600 * 1000


@dramatiq.actor(queue_name=QUEUE_IMPORT, max_retries=MAX_RETRIES, time_limit=TIME_LIMIT_MS,
                min_backoff=1000, max_backoff=60_000)
async def import_leads(import_id: int) -> None:
    res = await resources(settings)
    try:
        await run_import(res.pool, res.redis, settings, int(import_id), metrics=METRICS,
                         options=ImportOptions.from_settings(settings))
    except Exception as exc:
        # attempts are counted in Postgres (imports.attempts), not from the message: a
        # redelivery after a crash is an attempt too, and dramatiq's CurrentMessage is not
        # visible from the event-loop thread async actors run on
        text = f"{type(exc).__name__}: {exc}"[:500]
        try:
            attempts = await jobs.attempts(res.pool, int(import_id))
            final = attempts > MAX_RETRIES
            log.exception("import attempt failed", extra={"import_id": import_id, "attempt": attempts,
                                                           "final": final})
            if final:
                done = await jobs.finish(res.pool, int(import_id), jobs.FAILED,
                                         f"failed after {attempts} attempts: {text}")
                if done:
                    METRICS.jobs.labels(jobs.FAILED).inc()
            else:
                await jobs.record_retry(res.pool, int(import_id), f"attempt {attempts} failed, retrying: {text}")
        except Exception:
            log.warning("could not record the failure", exc_info=True)
        raise
