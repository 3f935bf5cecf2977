"""importer/uploads.py ``cleanup_uploads``, the rule shared by ``POST /api/upload/cleanup`` and
``mailgenius cleanup-uploads``, on the real database and a real folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from importer import jobs
from importer.uploads import cleanup_uploads

OLD = time.time() - 2 * 86400


def _file(path: Path, data: bytes = b"email\na@example.com\n", *, old: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, (OLD, OLD))
    return path


async def _import(pool, path: Path, status: str) -> int:
    row = await jobs.create(pool, filename=path.name, path=str(path), size=1, sha256="x", mode="skip",
                            tags=[], source=None, columns=None)
    await pool.execute("UPDATE imports SET status = $2 WHERE id = $1", row["id"], status)
    return row["id"]


async def test_keeps_the_upload_and_transcoding_of_unfinished_imports_only(pool, settings):
    up = Path(settings.upload_dir)
    keep = []
    for status in (jobs.QUEUED, jobs.RUNNING):
        csv = _file(up / f"{status}.csv")
        keep += [csv, _file(up / f"{status}.csv.utf8")]
        await _import(pool, csv, status)
    done = _file(up / "done.csv")
    gone = [done, _file(up / "done.csv.utf8"), _file(up / "dead.upload.tmp", b"x" * 100),
            _file(up / "old" / "nested.csv")]
    await _import(pool, done, jobs.COMPLETED)
    fresh = _file(up / "fresh.upload.tmp", old=False)

    res = await cleanup_uploads(pool, str(up), 3600, dry_run=True)
    assert res.removed == sorted(str(p) for p in gone) and res.kept == sorted(str(p) for p in keep)
    assert res.freed == sum(p.stat().st_size for p in gone) and res.requeued == [] and res.dry_run
    assert all(p.exists() for p in gone)

    res = await cleanup_uploads(pool, str(up), 3600)
    assert res.removed == sorted(str(p) for p in gone) and not res.failed
    assert not any(p.exists() for p in gone) and not (up / "old").exists()  # emptied subfolder too
    assert all(p.exists() for p in keep) and fresh.exists() and up.is_dir()


async def test_a_symlinked_upload_folder_changes_nothing(pool, settings, tmp_path):
    real = Path(settings.upload_dir)
    csv = _file(real / "running.csv")
    utf8 = _file(real / "running.csv.utf8")
    await _import(pool, csv, jobs.RUNNING)
    link = tmp_path / "uploads-link"
    link.symlink_to(real)
    res = await cleanup_uploads(pool, str(link), 0)
    assert res.removed == [] and len(res.kept) == 2 and csv.exists() and utf8.exists()


async def test_requeues_stuck_imports_through_the_callers_enqueue(pool, settings):
    up = Path(settings.upload_dir)
    stuck = await _import(pool, _file(up / "a.csv"), jobs.RUNNING)
    flagged = await _import(pool, _file(up / "b.csv"), jobs.QUEUED)
    busy = await _import(pool, _file(up / "c.csv"), jobs.QUEUED)
    await pool.execute("UPDATE imports SET cancel_requested = (id = $1), "
                       "updated_at = now() - interval '2 hours' WHERE id <> $2", flagged, busy)
    sent: list[int] = []

    async def enqueue(iid: int) -> None:
        sent.append(iid)

    res = await cleanup_uploads(pool, str(up), 3600, dry_run=True, stuck_after=1800)
    assert res.requeued == [stuck] and sent == []
    res = await cleanup_uploads(pool, str(up), 3600, stuck_after=1800, enqueue=enqueue)
    assert res.requeued == [stuck] and sent == [stuck]
    assert await pool.fetchval("SELECT updated_at > now() - interval '1 minute' FROM imports WHERE id = $1", stuck)
    assert (await cleanup_uploads(pool, str(up), 3600, stuck_after=1800, enqueue=enqueue)).requeued == []


async def test_a_missing_folder_is_empty_and_bad_ages_are_refused(pool, tmp_path):
    res = await cleanup_uploads(pool, str(tmp_path / "nope"), 0)
    assert res.removed == [] and res.kept == []
    with pytest.raises(ValueError):
        await cleanup_uploads(pool, str(tmp_path), -1)
    with pytest.raises(ValueError):
        await cleanup_uploads(pool, str(tmp_path), 0, stuck_after=10)  # requeue without enqueue
