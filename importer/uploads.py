"""The upload folder's cleanup, one rule for both callers: ``POST /api/upload/cleanup``
(importer/routes.py) and the operator's ``mailgenius cleanup-uploads`` (console/maintenance.py).

A file is removed when it is at least ``older_than`` seconds old and no queued or running import
needs it: an import needs its upload and the ``<upload>.utf8`` transcoding the reader writes
beside a file it converts (importer/reader.py). Paths are compared after ``os.path.realpath``,
so a symlinked upload folder changes nothing. Subfolders are walked too, and the ones left empty
are removed (never the upload folder itself). Optionally, imports without progress for
``stuck_after`` seconds get a new message (:func:`importer.jobs.requeue`).

Plain async functions over a pool (or one connection) and a folder: no aiohttp, no broker of
their own (the caller passes ``enqueue``), so the console can call them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import jobs

#: suffix of the file an upload streams into before it is complete
TEMP_SUFFIX = ".upload.tmp"
#: suffix of the UTF-8 transcoding the reader writes beside an upload it converts
TRANSCODED_SUFFIX = ".utf8"


@dataclass
class CleanupResult:
    #: files removed (or, in a dry run, that would be), absolute, sorted
    removed: list[str] = field(default_factory=list)
    #: bytes those files held
    freed: int = 0
    #: files old enough to go but kept for a queued or running import
    kept: list[str] = field(default_factory=list)
    #: files that could not be removed, with why (a vanished file is not an error)
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: imports requeued (or, in a dry run, that would be)
    requeued: list[int] = field(default_factory=list)
    dry_run: bool = False


def scan(root: str) -> list[tuple[str, int, float]]:
    """(path, bytes, mtime) of every regular file under ``root`` (symlinks not followed),
    sorted by path; empty when the folder does not exist."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if os.path.isfile(path) and not os.path.islink(path):
                out.append((path, st.st_size, st.st_mtime))
    return sorted(out)


def needed_paths(import_paths: set[str]) -> set[str]:
    """Real paths of the files the imports of ``import_paths`` still need: each upload and
    its transcoding."""
    return {os.path.realpath(p) for path in import_paths for p in (path, path + TRANSCODED_SUFFIX)}


def _remove(root: str, needed: set[str], older_than: float, dry_run: bool, result: CleanupResult) -> None:
    cutoff = time.time() - older_than
    for path, size, mtime in scan(root):
        if mtime > cutoff:
            continue
        if os.path.realpath(path) in needed:
            result.kept.append(path)
            continue
        if not dry_run:
            try:
                os.remove(path)
            except FileNotFoundError:  # gone meanwhile (an import finished and removed it)
                continue
            except OSError as exc:
                result.failed.append((path, exc.strerror or str(exc)))
                continue
        result.removed.append(path)
        result.freed += size
    if dry_run:
        return
    dirs = [os.path.join(d, name) for d, subdirs, _ in os.walk(root) for name in subdirs]
    for d in sorted(dirs, key=lambda p: p.count(os.sep), reverse=True):  # deepest first
        try:
            if not os.path.islink(d) and not os.listdir(d):
                os.rmdir(d)
        except OSError:
            pass


async def cleanup_uploads(pool, upload_dir: str, older_than: float, dry_run: bool = False, *,
                          stuck_after: float | None = None,
                          enqueue: Callable[[int], Awaitable[None]] | None = None) -> CleanupResult:
    """Remove the files under ``upload_dir`` older than ``older_than`` seconds that no queued or
    running import needs; with ``stuck_after``, requeue (through ``enqueue(import_id)``) the
    active imports without progress for that long. A dry run changes nothing and reports what
    would go. The file walk runs in a thread (the caller may be a web server's event loop)."""
    if older_than < 0 or (stuck_after is not None and stuck_after < 0):
        raise ValueError("ages must be >= 0")
    if stuck_after is not None and enqueue is None and not dry_run:
        raise ValueError("requeueing stuck imports needs an enqueue function")
    result = CleanupResult(dry_run=dry_run)
    needed = needed_paths(await jobs.active_paths(pool))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _remove, upload_dir, needed, older_than, dry_run, result)
    if stuck_after is not None:
        result.requeued = await jobs.stuck_ids(pool, stuck_after)
        if result.requeued and not dry_run:
            await jobs.requeue(pool, result.requeued, enqueue)
    return result
