"""importer/jobs.py on the real database: each transition moves only along TRANSITIONS, the
cancel request's two outcomes, and the one JSON view."""

from __future__ import annotations

import pytest

from importer import jobs
from mailgenius import errors
from mailgenius.import_states import ACTIVE, FINISHED, STATUSES, sql_list


async def _new(pool, status: str | None = None) -> int:
    row = await jobs.create(pool, filename="a.csv", path="/nowhere/a.csv", size=10, sha256="x",
                            mode="skip", tags=["t"], source=None, columns={"E-mail": "email"})
    if status is not None:  # put it there directly: the test is about what moves from there
        await pool.execute("UPDATE imports SET status = $2 WHERE id = $1", row["id"], status)
    return row["id"]


def test_the_vocabulary_is_the_tables_and_the_transitions_cover_it():
    assert set(ACTIVE) | set(FINISHED) == set(STATUSES) and not set(ACTIVE) & set(FINISHED)
    assert set(jobs.TRANSITIONS) == set(STATUSES)
    assert all(jobs.TRANSITIONS[s] == () for s in FINISHED)
    assert jobs.sources(jobs.COMPLETED) == (jobs.RUNNING,)
    assert sql_list(ACTIVE) == "('queued', 'running')"
    with pytest.raises(ValueError):
        sql_list(("paused",))


async def test_create_is_queued_and_its_view_is_the_api_shape(pool):
    row = await jobs.create(pool, filename="a.csv", path="/nowhere/a.csv", size=10, sha256="x",
                            mode="update", tags=["a", "b"], source="crm", columns={"Mail": "email"})
    v = jobs.view(row)
    assert v["status"] == jobs.QUEUED and v["tags"] == ["a", "b"] and v["columns"] == {"Mail": "email"}
    assert set(jobs.IMPORT_FIELDS) <= set(v)
    assert v["rows_per_second"] is None and v["eta_seconds"] is None and v["progress_percent"] == 0.0
    assert jobs.view(await jobs.get_row(pool, row["id"])) == v


async def test_claim_finish_and_no_way_out_of_a_finished_import(pool):
    iid = await _new(pool)
    claimed = await jobs.claim(pool, iid)
    assert claimed["status"] == jobs.RUNNING and claimed["attempts"] == 1 and claimed["started_at"]
    again = await jobs.claim(pool, iid)  # a redelivery resumes: same start, one more attempt
    assert again["attempts"] == 2 and again["started_at"] == claimed["started_at"]
    await pool.execute("UPDATE imports SET processed_rows = 7 WHERE id = $1", iid)
    done = await jobs.finish(pool, iid, jobs.COMPLETED)
    assert done["finished_at"] >= done["started_at"]
    row = await jobs.get_row(pool, iid)
    assert row["status"] == jobs.COMPLETED and row["total_rows"] == 7
    for status in FINISHED:  # finished: nothing moves it, nothing is changed
        assert await jobs.finish(pool, iid, status, "late") is None
    assert await jobs.claim(pool, iid) is None
    row = await jobs.get_row(pool, iid)
    assert row["status"] == jobs.COMPLETED and row["error"] is None
    with pytest.raises(ValueError):
        await jobs.finish(pool, iid, jobs.RUNNING)


async def test_a_queued_import_cannot_complete_without_being_claimed(pool):
    iid = await _new(pool)
    assert await jobs.finish(pool, iid, jobs.COMPLETED) is None
    assert await jobs.status_of(pool, iid) == jobs.QUEUED
    assert await jobs.finish(pool, iid, jobs.FAILED, "the job queue is unavailable")
    assert (await jobs.get_row(pool, iid))["error"] == "the job queue is unavailable"


async def test_cancel_request_cancels_a_queued_import_and_flags_a_running_one(pool):
    queued, running, done = await _new(pool), await _new(pool), await _new(pool, jobs.FAILED)
    assert await jobs.claim(pool, running)
    assert await jobs.request_cancel(pool, queued) == jobs.CANCELLED
    assert (await jobs.get_row(pool, queued))["finished_at"] is not None
    assert await jobs.request_cancel(pool, running) == jobs.RUNNING
    row = await jobs.get_row(pool, running)
    assert row["cancel_requested"] and row["finished_at"] is None
    assert await jobs.claim(pool, running) is None  # a redelivery does not restart it
    with pytest.raises(errors.Conflict, match="already failed"):
        await jobs.request_cancel(pool, done)
    with pytest.raises(errors.NotFound):
        await jobs.request_cancel(pool, 987654)


async def test_record_retry_notes_the_error_of_a_running_import_only(pool):
    queued, running = await _new(pool), await _new(pool)
    await jobs.claim(pool, running)
    for iid in (queued, running):
        await jobs.record_retry(pool, iid, "attempt 1 failed, retrying: boom")
    assert (await jobs.get_row(pool, queued))["error"] is None
    assert (await jobs.get_row(pool, running))["error"] == "attempt 1 failed, retrying: boom"
    assert await jobs.attempts(pool, running) == 1 and await jobs.attempts(pool, 987654) == 0


async def test_reads_by_status(pool):
    ids = {s: await _new(pool, s) for s in STATUSES}
    assert [r["id"] for r in await jobs.active_rows(pool)] == [ids[jobs.QUEUED], ids[jobs.RUNNING]]
    assert await jobs.recent_counts(pool) == {s: 1 for s in STATUSES}
    assert [r["id"] for r in await jobs.list_rows(pool, jobs.FAILED, 10, 0)] == [ids[jobs.FAILED]]
    assert len(await jobs.list_rows(pool, None, 10, 0)) == len(STATUSES)
    assert await jobs.active_paths(pool) == {"/nowhere/a.csv"}
