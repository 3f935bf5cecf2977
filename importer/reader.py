"""Streaming CSV reader and validator: bounded memory whatever the file size.

:func:`sniff` looks at a stored upload once (encoding, delimiter, header, row estimate) and
raises :class:`FileProblem` for what makes the whole file unusable (empty, binary, header only,
no email column). :class:`BatchReader` then walks the file from a byte offset (0, or the
checkpoint of a resumed import) and yields :class:`Batch` objects: the valid, first-seen rows as
CSV text ready for ``COPY``, and the per-row problems as error rows. Per-row work is kept tiny
(C csv parser, one precompiled regex, a per-batch set) because it runs 2,000,000 times.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import json
import os
import re
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from .mapping import Mapping, MappingProblem, detect, parse_tags, pg_array, split_name

#: Reasons of the error report (and label values of the validation-errors metric).
MISSING_EMAIL = "missing_email"
INVALID_SYNTAX = "invalid_syntax"
TOO_LONG = "too_long"
RAGGED_ROW = "ragged_row"
OVERSIZED_FIELD = "oversized_field"
DUPLICATE = "duplicate"
MALFORMED = "malformed"
LINE_TOO_LONG = "line_too_long"
REASONS = (MISSING_EMAIL, INVALID_SYNTAX, TOO_LONG, RAGGED_ROW, OVERSIZED_FIELD, DUPLICATE, MALFORMED,
           LINE_TOO_LONG)

#: RFC 5321 limits: whole address and local part.
MAX_EMAIL = 254
MAX_LOCAL = 64
#: Longest accepted field, characters; longer ones make the row an ``oversized_field`` error.
DEFAULT_MAX_FIELD = 4096
#: The csv module's own hard limit; a field beyond it (an unclosed quote swallowing the file)
#: raises and is reported as ``oversized_field`` without holding more than this in memory.
CSV_FIELD_LIMIT = 1 << 20
#: Longest physical line read, bytes (MAILGENIUS_IMPORT_MAX_LINE_BYTES): a longer header fails
#: the import, a longer data line becomes a ``line_too_long`` error row; either way the line is
#: skipped in chunks, never held whole.
DEFAULT_MAX_LINE = 1 << 20
#: Longest record (quoted newlines join lines), bytes: past it the record is a ``line_too_long``
#: error row and reading goes on with the next line.
MAX_RECORD_BYTES = 4 << 20
#: Bytes looked at to decide binary / delimiter.
SNIFF_BYTES = 64 * 1024
#: Chunk size of the whole-file pre-scan (encoding check and row estimate).
SCAN_CHUNK = 4 << 20
#: Longest raw text kept in an error row.
MAX_RAW = 2000

csv.field_size_limit(CSV_FIELD_LIMIT)

_ATOM = r"[\w!#$%&'*+/=?^`{|}~-]+"
#: local@domain; Unicode letters allowed (IDN domains, SMTPUTF8 local parts); TLD alphabetic
#: or punycode. Anchored by fullmatch.
EMAIL_RE = re.compile(
    rf"{_ATOM}(?:\.{_ATOM})*@(?:[^\W_](?:[\w-]{{0,61}}[^\W_])?\.)+(?:[^\W\d_]{{2,63}}|xn--[a-zA-Z0-9-]{{1,59}})"
)

#: the same pattern for pure-ASCII addresses (nearly all of them): for ASCII text ``\w``, ``\d``
#: and ``\W`` mean the same under re.ASCII, and this matches in 1.3 instead of 1.8 us
EMAIL_RE_ASCII = re.compile(EMAIL_RE.pattern, re.ASCII)

_BINARY_MAGIC = {
    b"PK\x03\x04": "a ZIP archive (an .xlsx workbook?)",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\xd0\xcf\x11\xe0": "an old Office document (.xls)",
}
_CP1252_UNDEFINED = (b"\x81", b"\x8d", b"\x8f", b"\x90", b"\x9d")
DELIMITERS = (",", ";", "\t", "|")


class FileProblem(Exception):
    """The whole file is unusable; the message says why, for the import's ``error``."""


@dataclass
class FileInfo:
    encoding: str  #: utf-8, utf-8-sig, utf-16, cp1252 or latin-1 (what was used)
    data_path: str  #: file to read: the upload, or its UTF-8 transcoding for UTF-16 input
    data_start: int  #: first byte after the BOM
    delimiter: str
    header: list[str]
    columns: dict[str, int]  #: lead field -> column index (email always present)
    extra: list[tuple[int, str]]  #: columns kept in attributes: (index, header name)
    body_start: int  #: byte offset of the first data row
    header_lines: int  #: physical lines of the header (1 unless it has quoted newlines)
    est_rows: int  #: newline count minus the header: exact unless fields hold newlines
    mapping: Mapping | None = None  #: the whole column mapping (what :attr:`columns` came from)


def text_encoding(encoding: str) -> str:
    """The codec the stored bytes are read with: UTF-16 input was transcoded to UTF-8, and the
    BOM of utf-8-sig is skipped by offset."""
    return "utf-8" if encoding in ("utf-8", "utf-8-sig", "utf-16") else encoding


def _detect_delimiter(first_line: str) -> str:
    counts = {}
    in_quotes = False
    for ch in first_line:
        if ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and ch in DELIMITERS:
            counts[ch] = counts.get(ch, 0) + 1
    if not counts:
        return ","
    return max(DELIMITERS, key=lambda d: counts.get(d, 0))


def _scan(path: str, start: int, limit: int | None = None) -> tuple[bool, bool, int]:
    """One pass over the file (or its first ``limit`` bytes, cut at the last newline):
    (valid UTF-8, valid cp1252, newline count)."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    utf8_ok = True
    cp1252_ok = True
    newlines = 0
    with open(path, "rb") as f:
        f.seek(start)
        if limit is not None:
            head = f.read(limit)
            if len(head) == limit and b"\n" in head:
                head = head[: head.rindex(b"\n") + 1]
            chunks = iter((head,))
        else:
            chunks = iter(lambda: f.read(SCAN_CHUNK), b"")
        for chunk in chunks:
            newlines += chunk.count(b"\n")
            if utf8_ok:
                try:
                    utf8.decode(chunk)
                except UnicodeDecodeError:
                    utf8_ok = False
            if not utf8_ok and cp1252_ok and any(b in chunk for b in _CP1252_UNDEFINED):
                cp1252_ok = False
    if utf8_ok:
        try:
            utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8_ok = False
    return utf8_ok, cp1252_ok, newlines


def _transcode_utf16(path: str, out_path: str) -> None:
    with open(path, "rb") as src, open(out_path + ".part", "wb") as dst:
        dec = codecs.getincrementaldecoder("utf-16")()
        while chunk := src.read(SCAN_CHUNK):
            dst.write(dec.decode(chunk).encode("utf-8"))
        dst.write(dec.decode(b"", final=True).encode("utf-8"))
    os.replace(out_path + ".part", out_path)


def sniff(path: str, override: dict[str, str] | None = None, *, max_line: int = DEFAULT_MAX_LINE,
          scan: bool = True) -> FileInfo:
    """Decide how to read ``path``; raise FileProblem when the file cannot be imported.

    ``override`` is the upload's explicit ``columns`` mapping; ``scan=False`` skips the
    whole-file pass (a preview of the file's first bytes: encoding decided on those alone)."""
    size = os.path.getsize(path)
    if size == 0:
        raise FileProblem("the file is empty")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    data_path, start = path, 0
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        data_path = path + ".utf8"
        if not os.path.exists(data_path):
            try:
                _transcode_utf16(path, data_path)
            except UnicodeDecodeError:
                raise FileProblem("the file starts with a UTF-16 byte-order mark but is not valid UTF-16") from None
        encoding, utf8_ok, cp_ok = "utf-16", True, True
        with open(data_path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        newlines = _scan(data_path, 0)[2]
    else:
        for magic, what in _BINARY_MAGIC.items():
            if head.startswith(magic):
                raise FileProblem(f"the file is binary ({what}), not CSV text; export it as CSV first")
        if b"\x00" in head:
            raise FileProblem("the file is binary (it contains NUL bytes), not CSV text")
        if head.startswith(codecs.BOM_UTF8):
            start = len(codecs.BOM_UTF8)
        utf8_ok, cp_ok, newlines = _scan(path, start, None if scan else SNIFF_BYTES)
        if utf8_ok:
            encoding = "utf-8-sig" if start else "utf-8"
        else:
            encoding = "cp1252" if cp_ok else "latin-1"
        controls = sum(1 for b in head if b < 9 or 13 < b < 32)
        if controls > len(head) // 20:
            raise FileProblem("the file is binary (too many control characters), not CSV text")
    text_enc = text_encoding(encoding)
    text = head[start:].decode(text_enc, errors="replace")
    if not text.strip():
        raise FileProblem("the file is empty (only blank lines)")
    first_line = text.split("\n", 1)[0]
    delimiter = _detect_delimiter(first_line)
    # the header: the first non-blank record
    with open(data_path, "rb") as f:
        f.seek(start)
        lines = _Lines(f, start, text_enc, max_line)
        reader = csv.reader(lines, delimiter=delimiter)
        header: list[str] | None = None
        try:
            for rec in reader:
                if rec and any(c.strip() for c in rec):
                    header = rec
                    break
        except csv.Error as exc:
            raise FileProblem(f"the header row cannot be parsed: {exc}") from None
        except LineTooLong:
            raise FileProblem(
                f"the header line is longer than {max_line:,} bytes (MAILGENIUS_IMPORT_MAX_LINE_BYTES); "
                "is this a CSV file with one header row?") from None
        header_lines = lines.n
        body_start = lines.pos
    if header is None:
        raise FileProblem("the file is empty (only blank lines)")
    try:
        mapping = detect(header, override)
    except MappingProblem as exc:
        raise FileProblem(str(exc)) from None
    with open(data_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        unterminated = f.read(1) != b"\n"
    est = max(0, newlines - header_lines + (1 if unterminated else 0))
    return FileInfo(encoding, data_path, start, delimiter, header, mapping.columns, mapping.extra, body_start,
                    header_lines, est, mapping)


class LineTooLong(Exception):
    """A physical line (or a record) over the cap: it was skipped, up to the next newline."""


class _Lines:
    """Decoded physical lines of a binary file, at most ``cap`` bytes each.

    ``pos`` is the byte offset after the last line handed out (csv.reader never reads ahead, so
    after it yields a record ``pos`` is exactly where that record ends) and ``n`` counts the
    physical lines consumed. A line over the cap is skipped in 1 MiB chunks and raises
    :class:`LineTooLong` (csv.reader passes it on and starts afresh at the next call); so does
    a record still growing ``record_cap`` bytes past ``rec_start``."""

    __slots__ = ("f", "pos", "enc", "cap", "n", "rec_start", "record_cap")

    def __init__(self, f, pos: int, encoding: str, cap: int, record_cap: int | None = None):
        self.f = f
        self.pos = pos
        self.enc = encoding
        self.cap = cap
        self.n = 0
        self.rec_start = pos
        self.record_cap = record_cap

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.f.readline(self.cap + 1)
        if not raw:
            raise StopIteration
        self.n += 1
        if len(raw) > self.cap and raw[-1] != 10:
            skipped = len(raw)
            while (chunk := self.f.readline(1 << 20)) and chunk[-1] != 10:
                skipped += len(chunk)
            self.pos += skipped + len(chunk)
            raise LineTooLong()
        self.pos += len(raw)
        if self.record_cap is not None and self.pos - self.rec_start > self.record_cap:
            raise LineTooLong()
        return raw.decode(self.enc, "replace")


@dataclass
class Batch:
    #: COPY text format (tab-separated, an empty field is NULL: see :data:`COPY_NULL`) for the
    #: staging table (columns: :attr:`BatchReader.stage_columns`); :func:`copy_records` reads it back
    copy_data: bytes
    staged: int  #: rows in copy_data
    rows: int  #: data records consumed (staged + errors), blank lines excluded
    #: (line, reason, raw) found while reading
    errors: list[tuple[int, str, str]]
    end_offset: int  #: byte offset after the last record of the batch (the checkpoint)
    end_line: int  #: physical lines consumed up to end_offset (header included)
    #: start line and start byte offset of every record of the batch, for raw look-ups
    rec_lines: array = field(default_factory=lambda: array("q"))
    rec_starts: array = field(default_factory=lambda: array("q"))

    def raw_of(self, fd: int, line: int, encoding: str) -> str:
        """The original text of the record starting at ``line`` (for DB-detected duplicates)."""
        i = bisect.bisect_left(self.rec_lines, line)
        if i >= len(self.rec_lines) or self.rec_lines[i] != line:
            return ""
        end = self.rec_starts[i + 1] if i + 1 < len(self.rec_starts) else self.end_offset
        return _pread(fd, self.rec_starts[i], end, encoding)


#: columns of the staging table, in the order the reader writes them
STAGE_COLUMNS = ("line", "email", "first_name", "last_name", "company", "phone", "tags", "source", "attributes")
#: NULL of the staged COPY text: the empty field (COPY ... NULL ''). No staged value is ever an
#: empty string (the reader turns empty cells into NULL), and unlike the default ``\N`` it
#: leaves every backslash in a line a sign that the line needs escaping
COPY_NULL = ""
_COPY_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_UNESCAPE = re.compile(r"\\(.)")
_COPY_UNESCAPES = {"t": "\t", "n": "\n", "r": "\r"}


def copy_line(fields) -> str:
    """One COPY text-format line (no terminator) of str fields or None (NULL), escaped (an
    empty string is NULL too)."""
    return "\t".join(COPY_NULL if f is None else _COPY_SPECIAL.sub(lambda m: _COPY_ESCAPES[m[0]], f)
                     for f in fields)


def copy_records(data: bytes) -> list[list[str | None]]:
    """The records of a batch's COPY data, fields unescaped (None for NULL): for previews."""
    out = []
    for line in data.decode("utf-8").split("\n")[:-1]:
        out.append([None if f == COPY_NULL else _COPY_UNESCAPE.sub(lambda m: _COPY_UNESCAPES.get(m[1], m[1]), f)
                    for f in line.split("\t")])
    return out


#: distinct raw tag cells remembered per import (real exports repeat a few combinations)
TAG_CACHE = 50_000


class RowMapper:
    """Turns one parsed record into the lead values (after the email is validated): first and
    last name (split from a full name when the file has no separate columns), company, phone
    (each trimmed of spaces, None when empty),
    the tag array literal (file tags merged with the upload's, parsed once per distinct cell),
    source and the attributes JSON (or None)."""

    def __init__(self, info: FileInfo, import_tags=()):
        cols = info.columns
        self.fi, self.li = cols.get("first_name"), cols.get("last_name")
        self.ci, self.pi, self.ti = cols.get("company"), cols.get("phone"), cols.get("tags")
        self.ji = cols.get("attributes_json")
        self.si = cols.get("source")
        self.phone_fallbacks = info.mapping.phone_fallbacks if info.mapping is not None else []
        m = info.mapping
        self.ni = cols.get("full_name") if m is None or m.split_name else None
        self.extra = [(i, n) for i, n in info.extra]
        self.import_tags = frozenset(import_tags)
        self.default_tags = pg_array(sorted(self.import_tags))
        self.tag_cache: dict[str, str] = {}

    def tags_literal(self, cell: str) -> str:
        lit = self.tag_cache.get(cell)
        if lit is None:
            tags = parse_tags(cell)
            lit = pg_array(sorted(self.import_tags.union(tags))) if tags else self.default_tags
            if len(self.tag_cache) >= TAG_CACHE:
                self.tag_cache.clear()
            self.tag_cache[cell] = lit
        return lit

    def values(self, row: list[str]) -> tuple:
        fi, li, ci, pi, ti, ni, ji = self.fi, self.li, self.ci, self.pi, self.ti, self.ni, self.ji
        first = row[fi] if fi is not None else None
        last = row[li] if li is not None else None
        if ni is not None:
            first, last = split_name(row[ni])
        attrs = {n: row[i] for i, n in self.extra if row[i]} if self.extra else None
        if ji is not None and row[ji].strip():
            try:
                obj = json.loads(row[ji])
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                attrs = {**obj, **(attrs or {})}
            else:
                attrs = {**(attrs or {}), "attributes": row[ji]}
        phone = row[pi] if pi is not None else None
        if self.phone_fallbacks and not phone.strip():
            phone = next((row[i] for i in self.phone_fallbacks if row[i].strip()), phone)
        # trimmed of spaces like Postgres' btrim(), and None (NULL) when nothing is left: the
        # merge inserts the staged values as they are
        return (first and first.strip(" ") or None, last and last.strip(" ") or None,
                ci is not None and row[ci].strip(" ") or None, phone and phone.strip(" ") or None,
                self.tags_literal(row[ti]) if ti is not None else self.default_tags,
                self.si is not None and row[self.si].strip(" ") or None,
                json.dumps(attrs) if attrs else None)


class BatchReader:
    """Walks the data rows from ``offset`` (the body start or a checkpoint), yielding batches.

    ``line`` is the number of physical lines before ``offset``, so error rows carry the
    file's own line numbers (1 = header) even after a resume.
    """

    stage_columns = list(STAGE_COLUMNS)

    def __init__(self, info: FileInfo, *, offset: int | None = None, line: int | None = None,
                 batch_rows: int = 25_000, max_field: int = DEFAULT_MAX_FIELD,
                 max_line: int = DEFAULT_MAX_LINE, import_tags=()):
        self.info = info
        self.offset = info.body_start if offset is None else offset
        self.line = info.header_lines if line is None else line
        self.batch_rows = batch_rows
        self.max_field = max_field
        self.max_line = max_line
        self.text_encoding = text_encoding(info.encoding)
        self.stop = threading.Event()
        self.mapper = RowMapper(info, import_tags)

    def batches(self) -> Iterator[Batch]:
        info = self.info
        ncols = len(info.header)
        ei = info.columns["email"]
        values = self.mapper.values
        max_field = self.max_field
        # a record this short cannot hold an oversized field: skips the per-field scan
        cheap_bytes = max_field
        fullmatch = EMAIL_RE.fullmatch
        fullmatch_ascii = EMAIL_RE_ASCII.fullmatch
        seps = len(STAGE_COLUMNS) - 1
        delim = info.delimiter
        enc = self.text_encoding
        fd_file = open(info.data_path, "rb", buffering=1 << 20)
        fd = fd_file.fileno()
        try:
            fd_file.seek(self.offset)
            lines = _Lines(fd_file, self.offset, enc, self.max_line, MAX_RECORD_BYTES)
            reader = csv.reader(lines, delimiter=delim)
            base_line = self.line
            start = self.offset
            prev_ln = 0
            done = False
            while not done:
                out: list[str] = []
                out_append = out.append
                errors: list[tuple[int, str, str]] = []
                seen: set[str] = set()
                seen_add = seen.add
                rec_lines = array("q")
                rec_starts = array("q")
                lines_append = rec_lines.append
                starts_append = rec_starts.append
                staged = 0
                rows = 0
                while rows < self.batch_rows:
                    if not rows & 4095 and self.stop.is_set():
                        return
                    lines.rec_start = start
                    try:
                        row = next(reader)
                    except StopIteration:
                        done = True
                        break
                    except (csv.Error, LineTooLong) as exc:
                        # an unclosed quote ran past the field limit, a NUL, a line or record
                        # over the cap: report and go on
                        ln = base_line + prev_ln + 1
                        prev_ln = lines.n
                        end = lines.pos
                        rows += 1
                        lines_append(ln)
                        starts_append(start)
                        if isinstance(exc, LineTooLong):
                            reason = LINE_TOO_LONG
                        else:
                            reason = OVERSIZED_FIELD if "field larger" in str(exc) else MALFORMED
                        errors.append((ln, reason, _pread(fd, start, end, enc)))
                        start = end
                        continue
                    ln = base_line + prev_ln + 1
                    prev_ln = lines.n
                    end = lines.pos
                    if len(row) != ncols:
                        if not row or (len(row) == 1 and not row[0].strip()):
                            start = end  # blank line: not a row
                            continue
                        rows += 1
                        lines_append(ln)
                        starts_append(start)
                        errors.append((ln, RAGGED_ROW, _pread(fd, start, end, enc)))
                        start = end
                        continue
                    rows += 1
                    lines_append(ln)
                    starts_append(start)
                    if end - start > cheap_bytes and max(map(len, row)) > max_field:
                        errors.append((ln, OVERSIZED_FIELD, _pread(fd, start, end, enc)))
                        start = end
                        continue
                    email = row[ei].strip()
                    if ":::" in email:  # Google Contacts: "a@x.com ::: b@y.com", the first one
                        email = email.split(":::", 1)[0].strip()
                    if not email:
                        errors.append((ln, MISSING_EMAIL, _pread(fd, start, end, enc)))
                    elif len(email) > MAX_EMAIL:
                        errors.append((ln, TOO_LONG, _pread(fd, start, end, enc)))
                    elif (fullmatch_ascii if email.isascii() else fullmatch)(email) is None:
                        errors.append((ln, INVALID_SYNTAX, _pread(fd, start, end, enc)))
                    else:
                        at = email.rindex("@")
                        if at > MAX_LOCAL:
                            errors.append((ln, TOO_LONG, _pread(fd, start, end, enc)))
                        else:
                            domain = email[at + 1:]
                            low = domain.lower()
                            if low != domain:
                                email = email[: at + 1] + low
                            key = email.lower()
                            if key in seen:
                                errors.append((ln, DUPLICATE, _pread(fd, start, end, enc)))
                            else:
                                seen_add(key)
                                staged += 1
                                a, b, c, d, e, f, g = values(row)
                                # COPY text format: one f-string (a third of csv.writer's time),
                                # escaped field by field only when a tab, newline, CR or
                                # backslash is somewhere in the line
                                line = (f"{ln}\t{email}\t{a or ''}\t{b or ''}\t{c or ''}\t{d or ''}\t{e}\t"
                                        f"{f or ''}\t{g or ''}")
                                if line.count("\t") != seps or "\\" in line or "\n" in line or "\r" in line:
                                    line = copy_line((str(ln), email, a, b, c, d, e, f, g))
                                out_append(line)
                    start = end
                if rows == 0 and done:
                    break
                if out:
                    out_append("")  # the last line's terminator
                yield Batch("\n".join(out).encode("utf-8"), staged, rows, errors, lines.pos,
                            base_line + lines.n, rec_lines, rec_starts)
        finally:
            fd_file.close()


def _pread(fd: int, start: int, end: int, encoding: str) -> str:
    n = min(end - start, MAX_RAW * 4)
    return os.pread(fd, n, start).decode(encoding, "replace").rstrip("\r\n")[:MAX_RAW]


_ARRAY_ITEM = re.compile(r'"((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")


def pg_array_items(literal: str) -> list[str]:
    """The elements of a literal written by :func:`pg_array` (for previews)."""
    return [_UNESCAPE.sub(r"\1", m) for m in _ARRAY_ITEM.findall(literal)]
