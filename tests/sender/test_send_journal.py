"""The send journal's write-ahead (sender/journal.py): a relay's 250s appended one line each while a
batch is in flight, turned into exactly the accepted messages when the process dies mid-batch
(a real ``kill -9`` of a real process, here), retired by truncation on the normal path, kept for
replay when a batch is interrupted, compacted while batches stay open, and found by a sibling
process of the same host before its next claim."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson

from sender import journal as journal_mod
from sender.journal import Journal, decode_outcomes, encode_outcomes, read_entries

ROOT = Path(__file__).resolve().parents[2]


def entries_of(path: str) -> list[dict]:
    with open(path, "rb") as fh:
        return read_entries(fh.read())


def test_a_killed_process_leaves_exactly_its_accepted_messages(tmp_path):
    directory = str(tmp_path / "j")
    # a worker with three batches in flight: batch a had two 250s (then a torn third line: killed
    # mid-write), batch b had one and was recorded normally, batch c none; then kill -9
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from sender.journal import Journal
        j = Journal({directory!r})
        a = j.open_batch("smtp", 7)
        b = j.open_batch("smtp", 7)
        c = j.open_batch("smtp", 8)
        j.accepted(a, 101, "<mg-101@example.com>")
        j.accepted(b, 201, "<mg-201@example.com>")
        j.accepted(a, 102, "<mg-102@example.com>")
        j.close_batch(b)
        os.write(j._fh.fileno(), b'{{"acc":"' + a.encode() + b'","id":103,"pid":"<mg-1')
        print(j.path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead_path = proc.stdout.strip()
    assert os.path.getsize(dead_path) > 0

    # the format alone: one entry, exactly a's two accepted messages (b retired, c empty, the
    # torn line skipped)
    (entry,) = entries_of(dead_path)
    assert decode_outcomes(entry) == ("smtp", 7, {101: "<mg-101@example.com>", 102: "<mg-102@example.com>"},
                                      {}, set(), {})

    # and as the next worker of this host finds it before its claim
    me = Journal(directory)
    assert me.dead_sibling() and me.foreign_pending
    found, busy = me.foreign()
    assert busy == 0 and [p for p, _, _ in found] == [dead_path]
    path, fh, found_entries = found[0]
    assert [decode_outcomes(e)[2] for e in found_entries] == [{101: "<mg-101@example.com>",
                                                               102: "<mg-102@example.com>"}]
    me.finish_foreign(path, fh)
    assert not os.path.exists(dead_path)
    me.foreign_pending = False
    assert not me.dead_sibling()
    me.close()


def test_the_normal_path_retires_batches_by_truncation(tmp_path):
    j = Journal(str(tmp_path / "j"))
    a = j.open_batch("smtp", 1)
    j.accepted(a, 1, "<mg-1@x>")
    b = j.open_batch("smtp", 1)
    j.accepted(b, 2, "<mg-2@x>")
    j.close_batch(a)  # b still open: a done line
    assert [decode_outcomes(e)[2] for e in entries_of(j.path)] == [{2: "<mg-2@x>"}]
    j.close_batch(b)  # nothing open or unrecorded: the file is emptied
    assert os.path.getsize(j.path) == 0 and not j.open and not j.pending()
    j.accepted(b, 3, "<mg-3@x>")  # a late answer of a retired batch writes nothing
    assert os.path.getsize(j.path) == 0
    j.close()
    assert not os.path.exists(j.path)


def test_an_interrupted_batch_is_kept_for_this_processes_next_claim(tmp_path):
    j = Journal(str(tmp_path / "j"))
    a = j.open_batch("smtp", 4)
    j.accepted(a, 41, "<mg-41@x>")
    empty = j.open_batch("smtp", 4)
    j.keep(a)  # e.g. the time limit cancelled it before its answers were recorded
    j.keep(empty)  # nothing accepted: nothing to keep
    (pending,) = j.pending()
    assert decode_outcomes(pending)[:3] == ("smtp", 4, {41: "<mg-41@x>"})
    assert a in j.abandoned and not j.open
    j.done(pending["key"])  # replayed
    assert os.path.getsize(j.path) == 0
    # closed with an interrupted batch's accepted messages still unrecorded: the file stays
    b = j.open_batch("smtp", 4)
    j.accepted(b, 42, "<mg-42@x>")
    j.close()
    assert [decode_outcomes(e)[2] for e in entries_of(j.path)] == [{42: "<mg-42@x>"}]


def test_a_long_busy_journal_is_compacted_to_what_is_still_open(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_mod, "COMPACT_BYTES", 4096)
    j = Journal(str(tmp_path / "j"))
    outage = j.write(encode_outcomes("smtp", 9, {90: "<mg-90@x>"}, {91: ("rejected", "550 no")}, set(), {}))
    slow = j.open_batch("smtp", 9)  # open the whole time: the file is never emptied
    n = 0
    for round_ in range(40):
        b = j.open_batch("smtp", 9)
        for _ in range(20):
            n += 1
            j.accepted(b, 1000 + n, f"<mg-{1000 + n}@x>")
        j.accepted(slow, round_, f"<mg-{round_}@x>")
        j.close_batch(b)
    assert os.path.getsize(j.path) < 2 * 4096  # ~40 KB written in all
    got = {e["key"]: decode_outcomes(e) for e in entries_of(j.path)}
    assert got == {outage: ("smtp", 9, {90: "<mg-90@x>"}, {91: ("rejected", "550 no")}, set(), {}),
                   slow: ("smtp", 9, {r: f"<mg-{r}@x>" for r in range(40)}, {}, set(), {})}
    assert not os.path.exists(j.path + ".tmp")
    j.close_batch(slow)
    j.done(outage)
    assert os.path.getsize(j.path) == 0
    j.close()


def test_two_journals_of_one_process_never_share_a_file(tmp_path):
    directory = str(tmp_path / "j")
    first, second = Journal(directory), Journal(directory)
    assert first.path != second.path
    first.accepted(first.open_batch("smtp", 1), 1, "<mg-1@x>")
    second.accepted(second.open_batch("smtp", 1), 2, "<mg-2@x>")  # would fail on the first's flock
    # neither takes the other for a dead process's journal
    first.foreign_pending = second.foreign_pending = False
    assert not first.dead_sibling() and not second.dead_sibling()
    assert first.foreign() == ([], 0) and second.foreign() == ([], 0)
    first.close()
    second.close()


def test_acc_lines_are_one_small_write_each(tmp_path):
    j = Journal(str(tmp_path / "j"))
    a = j.open_batch("smtp", 1)
    before = os.path.getsize(j.path)
    j.accepted(a, 123456789, "<mg-123456789@example.com>")
    line = Path(j.path).read_bytes()[before:]
    assert line.endswith(b"\n") and orjson.loads(line) == {"acc": a, "id": 123456789,
                                                          "pid": "<mg-123456789@example.com>"}
    assert len(line) < 80
    j.close_batch(a)
    j.close()
