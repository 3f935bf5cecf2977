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
import io
import json
import os
import re
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

#: Reasons of the error report (and label values of the validation-errors metric).
MISSING_EMAIL = "missing_email"
INVALID_SYNTAX = "invalid_syntax"
TOO_LONG = "too_long"
RAGGED_ROW = "ragged_row"
OVERSIZED_FIELD = "oversized_field"
DUPLICATE = "duplicate"
MALFORMED = "malformed"
REASONS = (MISSING_EMAIL, INVALID_SYNTAX, TOO_LONG, RAGGED_ROW, OVERSIZED_FIELD, DUPLICATE, MALFORMED)

#: RFC 5321 limits: whole address and local part.
MAX_EMAIL = 254
MAX_LOCAL = 64
#: Longest accepted field, characters; longer ones make the row an ``oversized_field`` error.
DEFAULT_MAX_FIELD = 4096
#: The csv module's own hard limit; a field beyond it (an unclosed quote swallowing the file)
#: raises and is reported as ``oversized_field`` without holding more than this in memory.
CSV_FIELD_LIMIT = 1 << 20
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

#: header aliases, compared after lower-casing and dropping spaces, '_', '-' and '.'
ALIASES = {
    "email": ("email", "emailaddress", "mail", "correo", "correoelectronico", "emailadresse", "courriel"),
    "first_name": ("firstname", "first", "givenname", "forename", "nombre", "prenom", "primeironome"),
    "last_name": ("lastname", "last", "surname", "familyname", "apellido", "apellidos", "nom", "sobrenome"),
    "company": ("company", "companyname", "organization", "organisation", "org", "empresa", "employer"),
    "phone": ("phone", "phonenumber", "telephone", "tel", "mobile", "mobilephone", "cell", "telefono", "telefone"),
    "tags": ("tags", "tag", "labels", "etiquetas"),
}
_ALIAS_OF = {alias: canon for canon, aliases in ALIASES.items() for alias in aliases}
#: columns of the staging table fed from named header columns (besides line and email)
OPTIONAL = ("first_name", "last_name", "company", "phone", "tags")

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


def _norm_header(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", name.strip().lstrip("\ufeff").lower())


@dataclass
class FileInfo:
    encoding: str  #: utf-8, utf-8-sig, utf-16, cp1252 or latin-1 (what was used)
    data_path: str  #: file to read: the upload, or its UTF-8 transcoding for UTF-16 input
    data_start: int  #: first byte after the BOM
    delimiter: str
    header: list[str]
    columns: dict[str, int]  #: canonical name -> column index (email always present)
    extra: list[tuple[int, str]]  #: unknown columns kept in attributes: (index, header name)
    body_start: int  #: byte offset of the first data row
    header_lines: int  #: physical lines of the header (1 unless it has quoted newlines)
    est_rows: int  #: newline count minus the header: exact unless fields hold newlines


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


def _scan(path: str, start: int) -> tuple[bool, bool, int]:
    """One pass over the file: (valid UTF-8, valid cp1252, newline count)."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    utf8_ok = True
    cp1252_ok = True
    newlines = 0
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(SCAN_CHUNK):
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


def sniff(path: str) -> FileInfo:
    """Decide how to read ``path``; raise FileProblem when the file cannot be imported."""
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
        utf8_ok, cp_ok, newlines = _scan(path, start)
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
        pos = [start]
        lines = _line_iter(f, pos, text_enc)
        reader = csv.reader(lines, delimiter=delimiter)
        header: list[str] | None = None
        try:
            for rec in reader:
                if rec and any(c.strip() for c in rec):
                    header = rec
                    break
        except csv.Error as exc:
            raise FileProblem(f"the header row cannot be parsed: {exc}") from None
        header_lines = reader.line_num
        body_start = pos[0]
    if header is None:
        raise FileProblem("the file is empty (only blank lines)")
    columns: dict[str, int] = {}
    extra: list[tuple[int, str]] = []
    for i, name in enumerate(header):
        canon = _ALIAS_OF.get(_norm_header(name))
        if canon is not None and canon not in columns:
            columns[canon] = i
        else:
            extra.append((i, name.strip().lstrip("\ufeff") or f"column_{i + 1}"))
    if "email" not in columns:
        shown = ", ".join(repr(h) for h in header[:20])
        raise FileProblem(
            f"no email column in the header (found {shown}); name one 'email', 'e-mail', "
            "'Email Address' or 'correo'"
        )
    with open(data_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        unterminated = f.read(1) != b"\n"
    est = max(0, newlines - header_lines + (1 if unterminated else 0))
    return FileInfo(encoding, data_path, start, delimiter, header, columns, extra, body_start,
                    header_lines, est)


def _line_iter(f, pos: list[int], encoding: str) -> Iterator[str]:
    """Decoded physical lines of a binary file; ``pos[0]`` is the byte offset after the last
    line handed out (csv.reader never reads ahead, so after it yields a record ``pos[0]`` is
    exactly where that record ends)."""
    p = pos[0]
    for raw in f:
        p += len(raw)
        pos[0] = p
        yield raw.decode(encoding, "replace")


@dataclass
class Batch:
    #: CSV text for COPY into the staging table (columns: :attr:`BatchReader.stage_columns`)
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


class BatchReader:
    """Walks the data rows from ``offset`` (the body start or a checkpoint), yielding batches.

    ``line`` is the number of physical lines before ``offset``, so error rows carry the
    file's own line numbers (1 = header) even after a resume.
    """

    def __init__(self, info: FileInfo, *, offset: int | None = None, line: int | None = None,
                 batch_rows: int = 25_000, max_field: int = DEFAULT_MAX_FIELD):
        self.info = info
        self.offset = info.body_start if offset is None else offset
        self.line = info.header_lines if line is None else line
        self.batch_rows = batch_rows
        self.max_field = max_field
        self.text_encoding = text_encoding(info.encoding)
        self.stop = threading.Event()
        cols = info.columns
        self.optional = [c for c in OPTIONAL if c in cols]
        self.stage_columns = ["line", "email", *self.optional] + (["attributes"] if info.extra else [])

    def batches(self) -> Iterator[Batch]:
        info = self.info
        ncols = len(info.header)
        ei = info.columns["email"]
        opt_idx = [info.columns[c] for c in self.optional]
        extra = info.extra
        extra_idx = [i for i, _ in extra]
        extra_names = [n for _, n in extra]
        max_field = self.max_field
        # a record this short cannot hold an oversized field: skips the per-field scan
        cheap_bytes = max_field
        fullmatch = EMAIL_RE.fullmatch
        dumps = json.dumps
        delim = info.delimiter
        enc = self.text_encoding
        fd_file = open(info.data_path, "rb", buffering=1 << 20)
        fd = fd_file.fileno()
        try:
            fd_file.seek(self.offset)
            pos = [self.offset]
            reader = csv.reader(_line_iter(fd_file, pos, enc), delimiter=delim)
            base_line = self.line
            start = self.offset
            prev_ln = 0
            done = False
            while not done:
                buf = io.StringIO()
                # "\r\n": a field holding a lone CR or LF is then quoted (COPY rejects a bare CR)
                writerow = csv.writer(buf, lineterminator="\r\n").writerow
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
                    try:
                        row = next(reader)
                    except StopIteration:
                        done = True
                        break
                    except csv.Error as exc:
                        # an unclosed quote ran past the field limit, or a NUL: report and go on
                        ln = base_line + prev_ln + 1
                        prev_ln = reader.line_num
                        end = pos[0]
                        rows += 1
                        lines_append(ln)
                        starts_append(start)
                        reason = OVERSIZED_FIELD if "field larger" in str(exc) else MALFORMED
                        errors.append((ln, reason, _pread(fd, start, end, enc)))
                        start = end
                        continue
                    ln = base_line + prev_ln + 1
                    prev_ln = reader.line_num
                    end = pos[0]
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
                    if not email:
                        errors.append((ln, MISSING_EMAIL, _pread(fd, start, end, enc)))
                    elif len(email) > MAX_EMAIL:
                        errors.append((ln, TOO_LONG, _pread(fd, start, end, enc)))
                    elif fullmatch(email) is None:
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
                                if extra:
                                    attrs = {n: row[i] for n, i in zip(extra_names, extra_idx, strict=True) if row[i]}
                                    writerow((ln, email, *[row[i] for i in opt_idx],
                                              dumps(attrs) if attrs else None))
                                elif opt_idx:
                                    writerow((ln, email, *[row[i] for i in opt_idx]))
                                else:
                                    writerow((ln, email))
                    start = end
                if rows == 0 and done:
                    break
                yield Batch(buf.getvalue().encode("utf-8"), staged, rows, errors, pos[0],
                            base_line + reader.line_num, rec_lines, rec_starts)
        finally:
            fd_file.close()


def _pread(fd: int, start: int, end: int, encoding: str) -> str:
    n = min(end - start, MAX_RAW * 4)
    return os.pread(fd, n, start).decode(encoding, "replace").rstrip("\r\n")[:MAX_RAW]
