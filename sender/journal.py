"""The send journal: a relay's answers that Postgres has not taken yet, kept on local disk.

Exactly once over SMTP rests on recording a relay's ``250`` before the batch is let go: a batch
handed back unrecorded is claimed again and sent again, and SMTP has no idempotency key. The
journal holds two kinds of entry, one file per process.

**Write-ahead of every accepted message** (the batch in flight; sender/delivery.py ``deliver``):

1. before an SMTP batch is sent, an ``open`` line names it (key, provider, campaign);
2. the moment the relay answers ``250`` for a message, an ``acc`` line (key, message id, the
   provider's message id) is appended with one plain ``write(2)`` on the unbuffered file: no
   ``fsync``, no Postgres round trip. What the kernel has survives a ``kill -9`` of the process;
3. once the batch's answers are recorded (or superseded by an outage entry, below), a ``done``
   line retires the batch, or the file is truncated when nothing else in it is open.

:func:`read_entries` turns a dead process's open batch into a record of exactly the messages it
has ``acc`` lines for; the next claim replays that (below), so a redelivered batch sends only what
the relay never accepted. What a ``kill -9`` can still duplicate: the messages in flight at that
instant, at most one per open SMTP connection (the relay accepted and we died before reading or
appending its 250). These lines are not ``fsync``'d: a *machine* crash (power, kernel panic) may
lose the last of them, and then those messages are sent again; keeping answers through a machine
crash is the job of the ``fsync``'d outage entries only.

**Outcome entries, when recording fails because Postgres is unreachable** (sender/ledger.py
``record_durably``):

1. the outcomes are appended to this journal at once (one JSON line, ``fsync``'d) - from then on
   no stop of the worker, even a machine crash, loses them;
2. the worker keeps retrying the record on a fresh connection, with back-off, within the retry
   budget; once it lands, a ``done`` line retires the entry (not fsync'd: replaying an entry twice
   is harmless, recording only moves rows still ``sending``);
3. if the worker must stop first (retry budget spent, time limit, shutdown), the entry stays.

**Replay.** This process's own unrecorded entries are replayed before its next claim. A journal
left by a dead process (same host and its pid gone, or its ``flock`` free) is replayed by the next
worker process of this host that claims a batch, before it claims: every claim checks the
directory for dead siblings (one directory scan), so a surviving process also picks up a killed
sibling's journal, not only the process started in its place.

One file per process, ``<data dir>/sender-journal/journal-<host>-<pid>.jsonl``, held under an
exclusive ``flock`` while the process lives. When it grows past :data:`COMPACT_BYTES` while
batches are open, it is rewritten with only what is still open or unrecorded (written to a
``.tmp`` file, ``fsync``'d, renamed over). A journal is local: a batch claimed on *another* host
before this host replays is sent again (keep a worker's data dir on a persistent volume).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import socket
import threading

import orjson

log = logging.getLogger(__name__)

SUBDIR = "sender-journal"
#: this host in journal file names (a data dir shared by containers: their pids repeat)
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
#: a journal file grown past this while batches are open is rewritten with only what is open
COMPACT_BYTES = 1 << 20
#: journal paths taken by a Journal of this process (a second one in the same directory, e.g. a
#: second event loop, gets ``journal-<host>-<pid>.<n>.jsonl``: two flocks on one file would clash)
_TAKEN: set[str] = set()
_TAKEN_LOCK = threading.Lock()


class Journal:
    def __init__(self, directory: str):
        self.directory = directory = os.path.abspath(directory)
        base = os.path.join(directory, f"journal-{_HOST}-{os.getpid()}")
        with _TAKEN_LOCK:
            path, n = base + ".jsonl", 1
            while path in _TAKEN:
                n += 1
                path = f"{base}.{n}.jsonl"
            _TAKEN.add(path)
        self.path = path
        self._fh = None
        self._seq = 0
        #: bytes appended since the file was last emptied or compacted
        self._size = 0
        #: entries written and not recorded yet, by key
        self.live: dict[str, dict] = {}
        #: keys of live entries whose batch gave up: replayed before this process's next claim
        self.abandoned: set[str] = set()
        #: batches talking to the relay now (write-ahead): key -> {provider, campaign_id, sent}
        self.open: dict[str, dict] = {}
        #: other processes' journals may still wait (checked at start, retried until replayed)
        self.foreign_pending = True
        self._write_failed = False

    @classmethod
    def for_data_dir(cls, data_dir: str) -> Journal:
        return cls(os.path.join(data_dir, SUBDIR))

    def _file(self):
        if self._fh is None:
            os.makedirs(self.directory, exist_ok=True)
            # unbuffered: every write() below is one write(2), in the kernel when it returns
            fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the process's life
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fh = fh
            self._size = os.fstat(fh.fileno()).st_size
        return self._fh

    def _append(self, data: bytes) -> None:
        fh = self._file()
        view = memoryview(data)
        while view:
            view = view[fh.write(view):]
        self._size += len(data)

    def _key(self) -> str:
        self._seq += 1
        return f"{os.getpid()}-{self._seq}"

    def write(self, entry: dict) -> str:
        """Append one outcome entry durably (fsync) and return its key."""
        key = self._key()
        entry = {**entry, "key": key}
        self._append(orjson.dumps(entry) + b"\n")
        os.fsync(self._file().fileno())
        self.live[key] = entry
        return key

    # -- write-ahead of a batch in flight ---------------------------------------------------

    def open_batch(self, provider: str, campaign_id: int | None) -> str:
        """A batch is about to be sent: its ``open`` line (not fsync'd). Returns its key, for
        :meth:`accepted` and then :meth:`close_batch` or :meth:`keep`."""
        key = self._key()
        self.open[key] = {"provider": provider, "campaign_id": campaign_id, "sent": {}}
        self._safe_append(orjson.dumps({"key": key, "open": 1, "provider": provider, "campaign_id": campaign_id})
                          + b"\n")
        return key

    def accepted(self, key: str, message_id: int, provider_id: str) -> None:
        """The relay accepted one message of batch ``key``: one ``acc`` line, one write(2), no
        fsync. Never raises (a full disk only loses the write-ahead: logged once)."""
        batch = self.open.get(key)
        if batch is None:
            return
        batch["sent"][message_id] = provider_id
        self._safe_append(orjson.dumps({"acc": key, "id": message_id, "pid": provider_id}) + b"\n")

    def _safe_append(self, data: bytes) -> None:
        try:
            self._append(data)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                log.error("could not write the send journal: a kill -9 now sends the batch in flight again",
                          extra={"path": self.path, "error": f"{type(exc).__name__}: {exc}"})

    def close_batch(self, key: str) -> None:
        """The batch's answers are recorded (or kept by an fsync'd outcome entry): retire it."""
        if self.open.pop(key, None) is not None:
            self._retire(key)

    def keep(self, key: str) -> None:
        """The batch stopped before its answers were recorded (cancelled, time limit): what the
        relay accepted becomes a live entry of this process, replayed before its next claim (the
        file already holds it as ``open`` + ``acc`` lines for a replay by another process)."""
        batch = self.open.pop(key, None)
        if batch is None:
            return
        if not batch["sent"]:
            self._retire(key)
            return
        self.live[key] = {**encode_outcomes(batch["provider"], batch["campaign_id"], batch["sent"], {}, set(), {}),
                          "key": key}
        self.abandoned.add(key)

    # -- retiring ----------------------------------------------------------------------------

    def done(self, key: str) -> None:
        """The entry is recorded in Postgres: retire it."""
        self.live.pop(key, None)
        self.abandoned.discard(key)
        self._retire(key)

    def _retire(self, key: str) -> None:
        try:
            fh = self._file()
            if not self.live and not self.open:
                fh.truncate(0)  # append mode: the next write goes to the (new) end
                self._size = 0
            else:
                self._append(orjson.dumps({"done": key}) + b"\n")
                if self._size > COMPACT_BYTES:
                    self._compact()
        except OSError as exc:  # a replay records it again: harmless
            log.warning("could not retire a send journal entry", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _compact(self) -> None:
        """Rewrite the file with only the live entries and the open batches (fsync'd, renamed
        over the old one under a lock of its own, so either file is whole after any crash)."""
        lines = [orjson.dumps(e) for e in self.live.values()]
        for key, b in self.open.items():
            lines.append(orjson.dumps({"key": key, "open": 1, "provider": b["provider"],
                                       "campaign_id": b["campaign_id"]}))
            lines.extend(orjson.dumps({"acc": key, "id": i, "pid": p}) for i, p in b["sent"].items())
        data = b"".join(line + b"\n" for line in lines)
        tmp = self.path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fh = open(tmp, "ab", buffering=0)  # noqa: SIM115 - becomes the journal file
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            view = memoryview(data)
            while view:
                view = view[fh.write(view):]
            os.fsync(fh.fileno())
            os.rename(tmp, self.path)
        except BaseException:
            fh.close()
            raise
        old, self._fh, self._size = self._fh, fh, len(data)
        old.close()

    def abandon(self, key: str) -> None:
        if key in self.live:
            self.abandoned.add(key)

    def pending(self) -> list[dict]:
        """Every entry of this process not recorded yet: those whose batch gave up, and those a
        batch is still retrying (recording one twice is harmless, and a claim must not see its
        rows ``sending`` after an outage longer than the stalled-campaign sweeper's patience).
        Batches still talking to the relay (:attr:`open`) are not: they record their own."""
        return [self.live[k] for k in sorted(self.live)]

    # -- other processes' journals -----------------------------------------------------------

    def dead_sibling(self) -> bool:
        """Whether a journal of a dead process of this host waits in the directory (one scan,
        checked before every claim): then :attr:`foreign_pending` is set again."""
        if self.foreign_pending:
            return True
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return False
        mine = os.path.basename(self.path)
        for name in names:
            if (name.startswith("journal-") and name.endswith(".jsonl") and name != mine
                    and os.path.join(self.directory, name) not in _TAKEN):
                host, pid = _owner_of(name)
                if host == _HOST and not _pid_alive(pid):
                    self.foreign_pending = True
                    return True
        return False

    def foreign(self) -> tuple[list[tuple[str, object, list[dict]]], int]:
        """Journals of dead processes: ([(path, locked file, open entries)], how many are busy).

        A journal whose process is alive is its owner's business and skipped. One whose process
        is dead but whose lock is held is being replayed by a sibling process right now: it is
        counted as busy, and the caller waits for it before claiming (so no process of this host
        claims a row a dead process's journal still holds). The caller replays the returned ones
        and calls :meth:`finish_foreign` or :meth:`release_foreign`."""
        out, busy = [], 0
        for tmp in glob.glob(os.path.join(self.directory, "journal-*.jsonl.tmp")):
            host, pid = _owner_of(tmp[:-len(".tmp")])
            if host == _HOST and not _pid_alive(pid):  # a compaction cut short: the journal is whole
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        for path in sorted(glob.glob(os.path.join(self.directory, "journal-*.jsonl"))):
            if path == self.path or path in _TAKEN:  # ours, or another live Journal of this process
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
        """Close the file; it is removed when nothing in it still waits to be recorded (a batch
        interrupted with accepted messages stays, for the next worker to replay)."""
        if self._fh is not None:
            empty = not self.live and not any(b["sent"] for b in self.open.values())
            self._fh.close()
            self._fh = None
            if empty:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        with _TAKEN_LOCK:
            _TAKEN.discard(self.path)


def _owner_of(path: str) -> tuple[str, int | None]:
    """(host, pid) of a journal file name ``journal-<host>-<pid>[.<n>].jsonl``."""
    host, _, pid = os.path.basename(path)[len("journal-"):-len(".jsonl")].rpartition("-")
    pid = pid.split(".", 1)[0]
    if not pid.isdigit():
        return host, None
    return host, int(pid)


def _pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not reaped yet, does not: its files, and so its
    journal's lock, are closed)."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def read_entries(raw: bytes) -> list[dict]:
    """The entries of a journal's bytes that no ``done`` line retired: the outcome entries as
    written, and each open batch as an entry whose ``sent`` is exactly its ``acc`` lines (one
    without any is left out: nothing of it was accepted). A torn last line, from a crash
    mid-write, is skipped: an outcome entry's was never fsync'd, so its batch was never let go; an
    ``acc`` line's message was in flight."""
    entries: dict[str, dict] = {}
    for line in raw.splitlines():
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(item, dict):
            continue
        if "acc" in item:
            batch = entries.get(item["acc"])
            if batch is not None and batch.get("open"):
                batch["sent"].append([item["id"], item["pid"]])
        elif "done" in item:
            entries.pop(item["done"], None)
        elif "key" in item:
            entries[item["key"]] = {**item, "sent": []} if item.get("open") else item
    return [e for e in entries.values() if not e.get("open") or e["sent"]]


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
