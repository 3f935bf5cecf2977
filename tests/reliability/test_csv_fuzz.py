"""hypothesis fuzzing of the importer's streaming CSV reader (importer/reader.py).

Whatever bytes arrive, :func:`sniff` either describes the file or raises ``FileProblem`` (a
clear message for the import's ``error``), and :class:`BatchReader` walks it to the end without
any other exception, within a time bound, accounting for every record exactly once (staged or
an error row with a known reason), and a resume from any checkpoint reproduces the rest of the
run. A separate test proves memory stays bounded on hostile multi-megabyte inputs.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

reader_mod = pytest.importorskip("importer.reader")
FileProblem = reader_mod.FileProblem
BatchReader = reader_mod.BatchReader
sniff = reader_mod.sniff

#: seconds one example may take before we call it a hang (real ones take milliseconds)
HANG_SECONDS = 10
#: fuzz examples per strategy: ~5 s each on this machine
EXAMPLES = int(os.environ.get("MAILGENIUS_FUZZ_EXAMPLES", "100"))


@contextmanager
def hang_guard(seconds: int = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise TimeoutError(f"the CSV reader did not finish within {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_all(path: str, *, batch_rows: int, offset=None, line=None):
    """(info, batches) or (FileProblem, None); anything else propagates and fails the test."""
    try:
        info = sniff(path)
    except FileProblem as exc:
        assert str(exc), "a FileProblem must say why"
        return exc, None
    batches = list(BatchReader(info, batch_rows=batch_rows, offset=offset, line=line).batches())
    return info, batches


def check_invariants(path: str, info, batches) -> None:
    size = os.path.getsize(info.data_path)
    last_line = info.header_lines
    last_offset = info.body_start
    for b in batches:
        assert b.rows == b.staged + len(b.errors), "every record is staged or an error, once"
        assert b.end_offset >= last_offset and b.end_offset <= size
        last_offset = b.end_offset
        staged_rows = reader_mod.copy_records(b.copy_data)
        assert len(staged_rows) == b.staged
        seen = set()
        for row in staged_rows:
            assert len(row) == len(reader_mod.STAGE_COLUMNS), row
            email = row[1]
            assert reader_mod.EMAIL_RE.fullmatch(email), email
            assert len(email) <= reader_mod.MAX_EMAIL
            assert email.lower() not in seen, "a duplicate was staged"
            seen.add(email.lower())
            if info.extra and row[-1]:
                assert isinstance(json.loads(row[-1]), dict), "attributes must be a JSON object"
        lines = sorted([int(r[0]) for r in staged_rows] + [e[0] for e in b.errors])
        assert len(lines) == len(set(lines)), "two records share a line number"
        if lines:
            assert lines[0] > last_line, (lines[0], last_line)
            last_line = lines[-1]
        for _line, reason, raw in b.errors:
            assert reason in reader_mod.REASONS, reason
            assert len(raw) <= reader_mod.MAX_RAW


def check_resume(path: str, batches, batch_rows: int) -> None:
    """Resuming from each checkpoint reproduces the remaining batches exactly."""
    for k in range(min(len(batches) - 1, 3)):
        cp = batches[k]
        _, rest = read_all(path, batch_rows=batch_rows, offset=cp.end_offset, line=cp.end_line)
        want = [(b.copy_data, b.errors, b.end_offset) for b in batches[k + 1:]]
        got = [(b.copy_data, b.errors, b.end_offset) for b in rest]
        assert got == want, f"resume from checkpoint {k} diverged"


def run_case(data: bytes, batch_rows: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "upload.csv")
        with open(path, "wb") as f:
            f.write(data)
        with hang_guard():
            info, batches = read_all(path, batch_rows=batch_rows)
            if batches is None:
                return
            check_invariants(path, info, batches)
            check_resume(path, batches, batch_rows)


# -- strategies ---------------------------------------------------------------------------------

HEADERS = ["email", "Email Address", "e-mail", "correo", "EMAIL", "\ufeffemail", " email "]
OTHER_COLS = ["first_name", "Last Name", "company", "phone", "tags", "plan", "", "email"]
FIELD_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
TRICKY = st.sampled_from(['"', '""', ",", ";", "\t", "|", "\n", "\r\n", "\r", "\x00", "=cmd()",
                          "a@b.co", "A@B.CO", "x@" + "y" * 300 + ".com", "é@ü.de", "@", "a@b",
                          "a" * 5000, '"unclosed', "\u2028", "\ufeff"])
field = st.one_of(st.text(FIELD_CHARS, max_size=30), TRICKY,
                  st.emails().map(str), st.builds(lambda a, b: f"{a}@{b}.com", st.text(max_size=8), st.text(max_size=8)))


@st.composite
def csv_files(draw) -> bytes:
    delim = draw(st.sampled_from([",", ";", "\t", "|"]))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    cols = [draw(st.sampled_from(HEADERS))] + draw(st.lists(st.sampled_from(OTHER_COLS), max_size=4))
    draw(st.randoms()).shuffle(cols)
    rows = draw(st.lists(st.lists(field, min_size=0, max_size=len(cols) + 2), max_size=25))
    quote = draw(st.booleans())

    def cell(v: str) -> str:
        if quote or any(c in v for c in (delim, '"', "\n", "\r")):
            return '"' + v.replace('"', '""') + '"'
        return v

    text = eol.join(delim.join(cell(v) for v in r) for r in [cols, *rows])
    if draw(st.booleans()):
        text += eol
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"]))
    data = text.encode(encoding, errors="replace") if encoding != "utf-16" else codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    if draw(st.integers(0, 9)) == 0:  # a truncated upload: cut anywhere, even mid-character
        data = data[: draw(st.integers(0, len(data)))]
    return data


raw_bytes = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda tail: b"email\n" + tail, st.binary(max_size=3000)),
    st.builds(lambda tail: b"\xef\xbb\xbfemail,name\r\n" + tail, st.binary(max_size=3000)),
    st.builds(lambda tail: codecs.BOM_UTF16_BE + tail, st.binary(max_size=500)),
)

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=csv_files(), batch_rows=st.integers(1, 7))
def test_fuzz_structured_csv(data, batch_rows):
    run_case(data, batch_rows)


@FUZZ
@given(data=raw_bytes, batch_rows=st.integers(1, 7))
def test_fuzz_raw_bytes(data, batch_rows):
    run_case(data, batch_rows)


# -- bounded memory -----------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import os, resource, sys
sys.path.insert(0, sys.argv[1])
from importer.reader import BatchReader, FileProblem, sniff
path = sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
records = 0
try:
    info = sniff(path)
    for b in BatchReader(info, batch_rows=50_000).batches():
        records += b.rows
except FileProblem as exc:
    print("problem", exc, file=sys.stderr)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, records)
"""

#: bytes of each hostile file
HOSTILE_BYTES = 12 << 20
#: allowed growth of the reader's peak RSS: a fraction of the input, so reading is streaming
MAX_GROWTH_BYTES = 64 << 20


def _write_hostile(path: Path, kind: str) -> None:
    chunk = 1 << 20
    with open(path, "wb") as f:
        if kind == "unclosed quote":  # one quote swallows the rest of the file
            f.write(b'email,name\na@b.co,"never closed\n')
            row = b"x@y.co,more text inside the open quote\n" * (chunk // 38)
        elif kind == "one endless line":  # no newline at all after the header
            f.write(b"email,name\n")
            row = b"a" * chunk
        elif kind == "millions of header columns":  # the whole file is one header row
            f.write(b"email")
            row = b",c" * (chunk // 2)
        else:  # "hundreds of thousands of tiny rows"
            f.write(b"email\n")
            row = b"".join(b"u%d@example.com\n" % i for i in range(chunk // 16))
        # tiny rows cost CPU per row, not memory: half the size proves the point in half the time
        limit = HOSTILE_BYTES // 2 if kind == "hundreds of thousands of tiny rows" else HOSTILE_BYTES
        while f.tell() < limit:
            f.write(row)


@pytest.mark.parametrize("kind", ["unclosed quote", "one endless line", "hundreds of thousands of tiny rows",
                                  "millions of header columns"])
def test_memory_stays_bounded_on_hostile_files(kind, tmp_path):
    path = tmp_path / "hostile.csv"
    _write_hostile(path, kind)
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, root, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before_kb, after_kb, records = map(int, proc.stdout.split())
    growth = (after_kb - before_kb) * 1024
    assert growth < MAX_GROWTH_BYTES, f"{kind}: peak RSS grew {growth / 2**20:.0f} MiB reading {HOSTILE_BYTES >> 20} MiB"
    if kind == "hundreds of thousands of tiny rows":
        assert records > 300_000
    if kind == "millions of header columns":
        assert "the header line is longer than" in proc.stderr, proc.stderr[-500:]
