"""The send journal: a relay's answers that Postgres could not take yet, kept on local disk.

Exactly once over SMTP rests on recording a relay's ``250`` before the batch is let go: a batch
handed back unrecorded is claimed again and sent again, and SMTP has no idempotency key. So when
recording fails because Postgres is unreachable (sender/delivery.py ``record_durably``):

1. the outcomes are appended to this journal at once (one JSON line, ``fsync``'d) - from then on
   no stop of the worker, even ``kill -9``, loses them;
2. the worker keeps retrying the record on a fresh connection, with back-off, within the retry
   budget; once it lands, a ``done`` line retires the entry (not fsync'd: replaying an entry twice
   is harmless, recording only moves rows still ``sending``);
3. if the worker must stop first (retry budget spent, time limit, shutdown), the entry stays; it is
   replayed before the next claim of this process, and a journal left by a dead process (its
   lock is free) is replayed by the next worker that starts on the same data dir.

One file per process, ``<data dir>/sender-journal/journal-<host>-<pid>.jsonl``, held under an
exclusive ``flock`` while the process lives. Only a ``kill -9`` between the relay's answer and the fsync
(the first failed record attempt, a few milliseconds) can still send a recipient twice, and a
journal is local: a batch claimed on *another* host before this host replays is sent again.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import socket

import orjson

log = logging.getLogger(__name__)

SUBDIR = "sender-journal"
#: this host in journal file names (a data dir shared by containers: their pids repeat)
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


class Journal:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, f"journal-{_HOST}-{os.getpid()}.jsonl")
        self._fh = None
        self._seq = 0
        #: entries written and not recorded yet, by key
        self.live: dict[str, dict] = {}
        #: keys of live entries whose batch gave up: replayed before this process's next claim
        self.abandoned: set[str] = set()
        #: other processes' journals may still wait (checked at start, retried until replayed)
        self.foreign_pending = True

    @classmethod
    def for_data_dir(cls, data_dir: str) -> Journal:
        return cls(os.path.join(data_dir, SUBDIR))

    def _file(self):
        if self._fh is None:
            os.makedirs(self.directory, exist_ok=True)
            fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the process's life
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fh = fh
        return self._fh

    def write(self, entry: dict) -> str:
        """Append one entry durably (fsync) and return its key."""
        self._seq += 1
        key = f"{os.getpid()}-{self._seq}"
        entry = {**entry, "key": key}
        fh = self._file()
        fh.write(orjson.dumps(entry) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
        self.live[key] = entry
        return key

    def done(self, key: str) -> None:
        """The entry is recorded in Postgres: retire it."""
        self.live.pop(key, None)
        self.abandoned.discard(key)
        fh = self._file()
        if not self.live:
            fh.truncate(0)  # append mode: the next write goes to the (new) end
        else:
            fh.write(orjson.dumps({"done": key}) + b"\n")
            fh.flush()

    def abandon(self, key: str) -> None:
        if key in self.live:
            self.abandoned.add(key)

    def pending(self) -> list[dict]:
        """Every entry of this process not recorded yet: those whose batch gave up, and those a
        batch is still retrying (recording one twice is harmless, and a claim must not see its
        rows ``sending`` after an outage longer than the stalled-campaign sweeper's patience)."""
        return [self.live[k] for k in sorted(self.live)]

    def foreign(self) -> tuple[list[tuple[str, object, list[dict]]], int]:
        """Journals of dead processes: ([(path, locked file, open entries)], how many are busy).

        A journal whose process is alive is its owner's business and skipped. One whose process
        is dead but whose lock is held is being replayed by a sibling process right now: it is
        counted as busy, and the caller waits for it before claiming (so no process of this host
        claims a row a dead process's journal still holds). The caller replays the returned ones
        and calls :meth:`finish_foreign` or :meth:`release_foreign`."""
        out, busy = [], 0
        for path in sorted(glob.glob(os.path.join(self.directory, "journal-*.jsonl"))):
            if path == self.path:
                continue
            host, pid = _owner_of(path)
            if host == _HOST and _pid_alive(pid):
                continue
            try:
                fh = open(path, "rb+")  # noqa: SIM115 - closed by finish/release_foreign
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                if host == _HOST:  # its owner is dead: a sibling is replaying it
                    busy += 1
                continue  # another host's: alive (or being replayed there); not ours to wait for

            try:
                current = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # a sibling replayed and removed it while we opened it
                fh.close()
                continue
            out.append((path, fh, read_entries(fh.read())))
        return out, busy

    @staticmethod
    def finish_foreign(path: str, fh) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fh.close()

    @staticmethod
    def release_foreign(fh) -> None:
        fh.close()

    def close(self) -> None:
        if self._fh is not None:
            empty = not self.live
            self._fh.close()
            self._fh = None
            if empty:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)


def _owner_of(path: str) -> tuple[str, int | None]:
    """(host, pid) of a journal file name ``journal-<host>-<pid>.jsonl``."""
    host, _, pid = os.path.basename(path)[len("journal-"):-len(".jsonl")].rpartition("-")
    try:
        return host, int(pid)
    except ValueError:
        return host, None


def _pid_alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_entries(raw: bytes) -> list[dict]:
    """The entries of a journal's bytes that no ``done`` line retired (a torn last line, from a
    crash mid-write, is skipped: it was never fsync'd, so its batch was never let go)."""
    entries: dict[str, dict] = {}
    for line in raw.splitlines():
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if "done" in item:
            entries.pop(item["done"], None)
        elif "key" in item:
            entries[item["key"]] = item
    return list(entries.values())


def encode_outcomes(provider: str, campaign_id: int | None, sent: dict[int, str],
                    failed: dict[int, tuple[str, str]], bounced: set[int],
                    details: dict[int, tuple[str, int | None]]) -> dict:
    return {"provider": provider, "campaign_id": campaign_id,
            "sent": [[i, p] for i, p in sent.items()],
            "failed": [[i, r, m] for i, (r, m) in failed.items()],
            "bounced": sorted(bounced),
            "details": [[i, s, c] for i, (s, c) in details.items()]}


def decode_outcomes(entry: dict) -> tuple:
    sent = {int(i): p for i, p in entry.get("sent", [])}
    failed = {int(i): (r, m) for i, r, m in entry.get("failed", [])}
    details = {int(i): (s, c) for i, s, c in entry.get("details", [])}
    return entry["provider"], entry.get("campaign_id"), sent, failed, set(entry.get("bounced", [])), details
