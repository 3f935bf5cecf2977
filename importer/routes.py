"""HTTP handlers and the route table of the importer API (docs/design.md "HTTP")."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mailgenius import errors
from mailgenius import keys as mkeys
from mailgenius.metrics import QUEUE_IMPORT
from mailgenius.queues import broker_queue_stats, worker_count
from mailgenius.web import UNAVAILABLE_ERRORS, Route, json_response, read_json

from . import jobs, keys
from .loader import ImportOptions, progress_key
from .mapping import MappingProblem, parse_override
from .reader import BatchReader, FileProblem, copy_records, pg_array_items, sniff
from .uploads import TEMP_SUFFIX, cleanup_uploads, scan

log = logging.getLogger(__name__)

#: bytes of multipart framing (boundaries, part headers, small fields) allowed beyond the cap
FORM_OVERHEAD = 64 * 1024
#: largest accepted text field (mode, tags, source)
MAX_FIELD_BYTES = 4096
#: largest ``columns`` field (an explicit mapping of a wide export)
MAX_COLUMNS_BYTES = 256 * 1024
#: bytes of the file a preview reads (the rest of the part is drained unread)
PREVIEW_BYTES = 1 << 20
#: rows a preview shows by default and at most
PREVIEW_ROWS, MAX_PREVIEW_ROWS = 20, 200
#: bytes read from the request per write to disk
CHUNK = 1 << 20
#: tags per import and characters per tag
MAX_TAGS, MAX_TAG_LEN = 50, 64
#: first characters that make a spreadsheet evaluate a cell (CSV/formula injection)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _parse_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²".isdigit() is True
        raise errors.NotFound(f"no import with id {raw!r}")
    return int(raw)


def _parse_progress(raw) -> int | None:
    if not raw:
        return None
    try:
        return int(json.loads(raw)["processed"])
    except (ValueError, KeyError, TypeError):
        return None


async def _live_processed(request: web.Request, import_ids: list[int]) -> list[int | None]:
    """Live processed counts of running imports (one MGET); None where there is none."""
    if not import_ids:
        return []
    settings = request.app[mkeys.SETTINGS]
    try:
        raws = await request.app[mkeys.REDIS].mget([progress_key(settings, i) for i in import_ids])
    except Exception:  # live progress is a nicety; the committed counts still answer
        return [None] * len(import_ids)
    return [_parse_progress(raw) for raw in raws]


# -- upload ------------------------------------------------------------------------------------

async def _read_small(part, limit: int = MAX_FIELD_BYTES) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > limit:
            raise errors.ValidationError(f"form field {part.name!r} is longer than {limit} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise errors.ValidationError(f"form field {part.name!r} is not UTF-8 text") from None


@dataclass
class ReceivedForm:
    """A multipart form whose one ``file`` part went to disk (see :func:`_receive_form`)."""

    fields: dict[str, str]
    filename: str
    #: bytes of the whole file part (all of it counted against the cap, even what is not kept)
    size: int
    #: SHA-256 of the whole file (only when it is kept whole)
    sha256: str | None
    #: the part went beyond ``keep`` bytes, which are all that was written
    truncated: bool


async def _receive_form(request: web.Request, path: str, *, cap: int, too_large: str,
                        small: dict[str, int], keep: int | None = None) -> ReceivedForm:
    """Read the form of an upload (or a preview): its one ``file`` part streamed to ``path``
    (never whole in memory; the first ``keep`` bytes only when ``keep`` is given), the ``small``
    text fields up to their byte limits, any other part drained unread. A malformed body, a
    missing or second file part, a file over ``cap`` bytes: a 4xx error."""
    fields: dict[str, str] = {}
    filename, size, stored, truncated = "upload.csv", 0, False, False
    digest = hashlib.sha256() if keep is None else None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if part.name == "file":
                if stored:
                    raise errors.ValidationError("send exactly one 'file' part")
                filename = (part.filename or "upload.csv")[:255]
                with open(path, "wb") as f:
                    while chunk := await part.read_chunk(CHUNK):
                        size += len(chunk)
                        if size > cap:
                            raise errors.PayloadTooLarge(too_large)
                        if digest is not None:
                            digest.update(chunk)
                            f.write(chunk)
                            continue
                        room = keep - f.tell()
                        if room > 0:
                            f.write(chunk[:room])
                        if len(chunk) > room:
                            truncated = True
                stored = True
            elif part.name in small:
                fields[part.name] = await _read_small(part, small[part.name])
            else:
                while await part.read_chunk(CHUNK):  # unknown part: drained, ignored
                    pass
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:  # malformed multipart body
        raise errors.AppError(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    if not stored:
        raise errors.ValidationError("no 'file' part in the form", code="missing_file")
    return ReceivedForm(fields, filename, size, digest.hexdigest() if digest is not None else None, truncated)


def _parse_options(fields: dict[str, str]) -> tuple[str, list[str], str | None]:
    mode = (fields.get("mode") or "skip").lower()
    if mode not in ("skip", "update"):
        raise errors.ValidationError(f"mode must be 'skip' or 'update', got {mode!r}", code="invalid_mode")
    tags: list[str] = []
    for t in (fields.get("tags") or "").replace(";", ",").split(","):
        t = t.strip()
        if t and t not in tags:
            if len(t) > MAX_TAG_LEN:
                raise errors.ValidationError(f"tag {t[:20]!r}… is longer than {MAX_TAG_LEN} characters")
            tags.append(t)
    if len(tags) > MAX_TAGS:
        raise errors.ValidationError(f"at most {MAX_TAGS} tags per import")
    source = fields.get("source") or None
    if source is not None and len(source) > 200:
        raise errors.ValidationError("source is longer than 200 characters")
    return mode, sorted(tags), source


async def upload(request: web.Request) -> web.Response:
    """Stream a CSV to disk (never whole in memory), record it and queue its import."""
    app = request.app
    settings = app[mkeys.SETTINGS]
    cap = settings.upload_max_bytes
    if request.content_type != "multipart/form-data":
        raise errors.AppError("send the CSV as multipart/form-data with a 'file' part",
                              code="unsupported_media_type", status=415)
    too_large = f"the upload exceeds the {cap} byte limit (MAILGENIUS_UPLOAD_MAX_BYTES)"
    if request.content_length is not None and request.content_length > cap + FORM_OVERHEAD:
        raise errors.PayloadTooLarge(too_large)
    os.makedirs(settings.upload_dir, exist_ok=True)
    token = uuid.uuid4().hex
    tmp_path = os.path.join(settings.upload_dir, token + TEMP_SUFFIX)
    final_path = None
    try:
        form = await _receive_form(request, tmp_path, cap=cap, too_large=too_large,
                                   small={"mode": MAX_FIELD_BYTES, "tags": MAX_FIELD_BYTES,
                                          "source": MAX_FIELD_BYTES, "columns": MAX_COLUMNS_BYTES})
        fields, filename, size = form.fields, form.filename, form.size
        mode, tags, source = _parse_options(fields)
        override = _parse_columns(fields)
        final_path = os.path.abspath(os.path.join(settings.upload_dir, token + ".csv"))
        os.replace(tmp_path, final_path)
        if override is not None:
            await _check_columns(final_path, override, ImportOptions.from_settings(settings))
    except BaseException:
        for p in (tmp_path, final_path, final_path and final_path + ".utf8"):
            try:
                if p:
                    os.remove(p)
            except OSError:
                pass
        raise
    pool = app[mkeys.DB]
    try:
        row = await jobs.create(pool, filename=filename, path=final_path, size=size, sha256=form.sha256,
                                mode=mode, tags=tags, source=source, columns=override)
    except BaseException:
        os.remove(final_path)
        raise
    import_id = row["id"]
    app[keys.UPLOAD_BYTES].inc(size)
    try:
        await _enqueue(app, import_id)
    except Exception as exc:
        log.error("could not enqueue import", extra={"import_id": import_id, "error": str(exc)})
        await jobs.finish(pool, import_id, jobs.FAILED, "the job queue is unavailable; upload the file again later")
        raise errors.Unavailable("the job queue is unavailable; try again shortly") from None
    log.info("upload stored and queued", extra={"import_id": import_id, "bytes": size})
    return json_response(jobs.view(row), status=202)  # the row as created: queued


async def _enqueue(app: web.Application, import_id: int) -> None:
    """One ``import_leads(import_id)`` message on the import queue (the broker client blocks: a thread)."""
    from mailgenius.worker import enqueue

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, enqueue, app[keys.BROKER], QUEUE_IMPORT, "import_leads", import_id)


def _parse_columns(fields: dict[str, str]) -> dict[str, str] | None:
    raw = fields.get("columns")
    if not raw:
        return None
    try:
        return parse_override(raw)
    except MappingProblem as exc:
        raise errors.ValidationError(str(exc), code="invalid_columns") from None


async def _check_columns(path: str, override: dict[str, str], opts: ImportOptions) -> None:
    """An explicit mapping must fit the file's header: checked on the first bytes, at upload."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, lambda: sniff(path, override, scan=False,
                                                       max_line=opts.max_line))
    except FileProblem as exc:
        raise errors.ValidationError(f"the columns mapping does not fit the file: {exc}",
                                     code="invalid_columns") from None


# -- preview -----------------------------------------------------------------------------------

def _preview(path: str, override: dict[str, str] | None, n_rows: int, truncated: bool,
             opts: ImportOptions) -> dict:
    if truncated:  # the last line was cut by the byte limit: drop it
        with open(path, "r+b") as f:
            data = f.read()
            if b"\n" in data:
                f.truncate(data.rindex(b"\n") + 1)
    try:
        info = sniff(path, override, scan=False, max_line=opts.max_line)
    except FileProblem as exc:
        code = "invalid_columns" if override is not None else "unusable_file"
        raise errors.ValidationError(str(exc), code=code) from None
    reader = BatchReader(info, batch_rows=n_rows, max_field=opts.max_field, max_line=opts.max_line)
    batch = next(iter(reader.batches()), None)
    rows, rejected = [], []
    if batch is not None:
        for rec in copy_records(batch.copy_data):
            line, email, first, last, company, phone, tags, source, attrs = rec
            rows.append({"line": int(line), "email": email, "first_name": first, "last_name": last,
                         "company": company, "phone": phone, "tags": pg_array_items(tags),
                         "source": source, "attributes": json.loads(attrs) if attrs else {}})
        rejected = [{"line": ln, "reason": reason, "raw": raw} for ln, reason, raw in batch.errors]
    mapping = info.mapping.describe()
    return {
        "encoding": info.encoding, "delimiter": info.delimiter,
        "header": [m["column"] for m in mapping],
        "mapping": mapping,
        "fields": {f: info.mapping.header[i].strip().lstrip("\ufeff") for f, i in info.columns.items()},
        "attributes": [m["column"] for m in mapping if m["field"] in ("attribute", "full_name")],
        "ignored_columns": [n for _, n in info.mapping.ignored],
        "rows": rows, "rejected": rejected,
        "truncated": truncated,
    }


async def upload_preview(request: web.Request) -> web.Response:
    """What an upload of this file would do, without creating an import: encoding, delimiter,
    the proposed mapping, the first rows as they would be stored and the rows that would be
    rejected. Reads at most PREVIEW_BYTES of the file (the rest is drained unread)."""
    settings = request.app[mkeys.SETTINGS]
    if request.content_type != "multipart/form-data":
        raise errors.AppError("send the CSV as multipart/form-data with a 'file' part",
                              code="unsupported_media_type", status=415)
    os.makedirs(settings.upload_dir, exist_ok=True)
    tmp_path = os.path.join(settings.upload_dir, uuid.uuid4().hex + ".preview" + TEMP_SUFFIX)
    try:
        form = await _receive_form(request, tmp_path, cap=settings.upload_max_bytes,
                                   too_large="the file exceeds the upload size cap",
                                   small={"columns": MAX_COLUMNS_BYTES, "rows": MAX_FIELD_BYTES},
                                   keep=PREVIEW_BYTES)
        fields, size, truncated = form.fields, form.size, form.truncated
        raw_rows = fields.get("rows") or str(PREVIEW_ROWS)
        if not (raw_rows.isascii() and raw_rows.isdigit()) or not 1 <= int(raw_rows) <= MAX_PREVIEW_ROWS:
            raise errors.ValidationError(f"rows must be an integer from 1 to {MAX_PREVIEW_ROWS}")
        override = _parse_columns(fields)
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(None, _preview, tmp_path, override, int(raw_rows), truncated,
                                          ImportOptions.from_settings(settings))
    finally:
        for p in (tmp_path, tmp_path + ".utf8"):
            try:
                os.remove(p)
            except OSError:
                pass
    body["bytes_read"] = min(size, PREVIEW_BYTES)
    return json_response(body)


# -- reads -------------------------------------------------------------------------------------

async def get_import(request: web.Request) -> web.Response:
    """One import: status, counts, rows per second and ETA."""
    import_id = _parse_id(request)
    row = await jobs.get_row(request.app[mkeys.DB], import_id)
    if row is None:
        raise errors.NotFound(f"no import with id {import_id}")
    live = (await _live_processed(request, [import_id]))[0] if row["status"] == jobs.RUNNING else None
    return json_response(jobs.view(row, live))


async def list_imports(request: web.Request) -> web.Response:
    """Imports, newest first; ?status= filters, ?limit= (1-500, default 50) and ?offset= page."""
    q = request.query
    status = q.get("status")
    if status is not None and status not in jobs.STATUSES:
        raise errors.ValidationError(f"unknown status {status!r}")
    try:
        limit = int(q.get("limit", "50"))
        offset = int(q.get("offset", "0"))
    except ValueError:
        raise errors.ValidationError("limit and offset must be integers") from None
    if not 1 <= limit <= 500 or not 0 <= offset <= 1_000_000:
        raise errors.ValidationError("limit must be 1-500 and offset 0-1000000")
    rows = await jobs.list_rows(request.app[mkeys.DB], status, limit, offset)
    return json_response({"imports": [jobs.view(r) for r in rows], "limit": limit, "offset": offset})


def escape_cell(value: str) -> str:
    """Neutralise spreadsheet formulas: a cell starting with = + - @ tab or CR gets a leading '."""
    if value and value[0] in FORMULA_PREFIXES:
        return "'" + value
    return value


async def import_errors(request: web.Request) -> web.StreamResponse:
    """The error report as CSV ``line,reason,raw``, streamed from Postgres."""
    import_id = _parse_id(request)
    pool = request.app[mkeys.DB]
    if await pool.fetchval("SELECT 1 FROM imports WHERE id = $1", import_id) is None:
        raise errors.NotFound(f"no import with id {import_id}")
    resp = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="import-{import_id}-errors.csv"',
    })
    await resp.prepare(request)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(("line", "reason", "raw"))
    async with pool.acquire() as conn, conn.transaction():
        n = 0
        async for r in conn.cursor(
                "SELECT line, reason, raw FROM import_errors WHERE import_id = $1 ORDER BY line",
                import_id, prefetch=5000):
            writer.writerow((r[0], escape_cell(r[1]), escape_cell(r[2])))
            n += 1
            if n % 5000 == 0:
                await resp.write(buf.getvalue().encode("utf-8"))
                buf.seek(0)
                buf.truncate()
    await resp.write(buf.getvalue().encode("utf-8"))
    await resp.write_eof()
    return resp


# -- cancel ------------------------------------------------------------------------------------

#: seconds the cancel request waits for the worker to stop (the worker polls every 0.25 s)
CANCEL_WAIT = 2.5


async def cancel_import(request: web.Request) -> web.Response:
    """Stop an import: batches committed before the cancel are kept; the response says how many."""
    import_id = _parse_id(request)
    pool = request.app[mkeys.DB]
    await jobs.request_cancel(pool, import_id)
    deadline = time.monotonic() + CANCEL_WAIT
    while True:
        full = await pool.fetchrow(jobs.SELECT + " WHERE id = $1", import_id)
        if full["status"] != jobs.RUNNING or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    view = jobs.view(full)
    kept = {k: full[k] for k in ("processed_rows", "inserted", "updated", "duplicates", "invalid")}
    if full["status"] == jobs.CANCELLED:
        message = (f"import cancelled: {kept['processed_rows']} rows processed before the cancel are kept "
                   f"({kept['inserted']} inserted, {kept['updated']} updated); the rest of the file was not imported")
        status = 200
    elif full["status"] == jobs.RUNNING:
        message = ("cancel requested; the worker stops at its next check and keeps only the batches "
                   "committed so far: read GET /api/imports/{id} for the final counts")
        status = 202
    else:
        message = f"import {full['status']} before the cancel took effect; everything was kept"
        status = 200
    return json_response({**view, "kept": kept, "message": message}, status=status)


# -- upload monitoring and cleanup --------------------------------------------------------------

async def upload_monitoring(request: web.Request) -> web.Response:
    """Disk, stored files, imports by status, active imports, queue depth and workers."""
    app = request.app
    settings = app[mkeys.SETTINGS]
    pool = app[mkeys.DB]
    loop = asyncio.get_running_loop()
    files = await loop.run_in_executor(None, scan, settings.upload_dir)
    temp = [f for f in files if f[0].endswith((TEMP_SUFFIX, ".part"))]
    disk = None
    if os.path.isdir(settings.upload_dir):
        u = shutil.disk_usage(settings.upload_dir)
        disk = {"free_bytes": u.free, "total_bytes": u.total,
                "used_percent": round(100.0 * (u.total - u.free) / u.total, 1)}
    counts = await jobs.recent_counts(pool)
    active = await jobs.active_rows(pool, 50)
    redis = app[mkeys.REDIS]
    try:  # the kernel's reading of either broker (RabbitMQ: ready messages, no head age)
        st = await broker_queue_stats(settings, redis, QUEUE_IMPORT)
    except UNAVAILABLE_ERRORS:
        raise
    except Exception as exc:  # pika's AMQP errors: the broker is down, not a bug of ours
        raise errors.Unavailable(f"the {settings.broker_kind} broker is unavailable: {type(exc).__name__}") from exc
    queue = {"waiting": st.waiting, "delayed": st.delayed, "dead": st.dead,
             "oldest_age_seconds": None if st.oldest_age_seconds is None else round(st.oldest_age_seconds, 1)}
    running = [r["id"] for r in active if r["status"] == jobs.RUNNING]
    live = dict(zip(running, await _live_processed(request, running), strict=True))
    active_views = [jobs.view(r, live.get(r["id"])) for r in active]
    return json_response({
        "upload_dir": os.path.abspath(settings.upload_dir),
        "max_upload_bytes": settings.upload_max_bytes,
        "disk": disk,
        "files": {"count": len(files), "bytes": sum(f[1] for f in files),
                  "temp_count": len(temp), "temp_bytes": sum(f[1] for f in temp)},
        "imports_24h": counts,
        "active": active_views,
        "queue": queue,
        "workers": await worker_count(redis, settings.redis_prefix, QUEUE_IMPORT),
    })


async def upload_cleanup(request: web.Request) -> web.Response:
    """Remove stale temp files and files no queued/running import needs; requeue stuck imports
    (safe: a job that is in fact still running ignores the second delivery). The rule is
    importer/uploads.py's ``cleanup_uploads``, shared with ``mailgenius cleanup-uploads``."""
    app = request.app
    settings = app[mkeys.SETTINGS]
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise errors.ValidationError("the body must be a JSON object")
    try:
        max_age = float(body.get("max_age_seconds", 3600))
        stuck_after = float(body.get("stuck_after_seconds", 1800))
    except (TypeError, ValueError):
        raise errors.ValidationError("max_age_seconds and stuck_after_seconds must be numbers") from None
    dry_run = bool(body.get("dry_run", False))
    if max_age < 0 or stuck_after < 0:
        raise errors.ValidationError("ages must be >= 0")
    res = await cleanup_uploads(app[mkeys.DB], settings.upload_dir, max_age, dry_run,
                                stuck_after=stuck_after, enqueue=lambda iid: _enqueue(app, iid))
    removed = [os.path.relpath(p, settings.upload_dir) for p in res.removed]
    for path, why in res.failed:
        log.warning("upload cleanup could not remove a file", extra={"path": path, "error": why})
    log.info("upload cleanup", extra={"removed": len(removed), "requeued": res.requeued, "dry_run": dry_run})
    return json_response({"removed_files": removed, "freed_bytes": res.freed, "requeued": res.requeued,
                          "dry_run": dry_run})


# -- route table -------------------------------------------------------------------------------

IMPORT_SCHEMA = {
    "type": "object",
    "required": ["id", "status", "filename", "bytes", "total_rows", "processed_rows", "inserted",
                 "updated", "duplicates", "invalid", "rows_per_second", "eta_seconds", "error"],
    "properties": {
        "id": {"type": "integer"},
        "status": {"type": "string", "enum": list(jobs.STATUSES)},
        "filename": {"type": "string"},
        "bytes": {"type": "integer"},
        "total_rows": {"type": "integer", "nullable": True},
        "processed_rows": {"type": "integer"},
        "inserted": {"type": "integer"},
        "updated": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "invalid": {"type": "integer"},
        "rows_per_second": {"type": "number", "nullable": True},
        "eta_seconds": {"type": "number", "nullable": True},
        "error": {"type": "string", "nullable": True},
    },
}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


UPLOAD_REQUEST = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "mode": {"type": "string", "enum": ["skip", "update"], "default": "skip"},
        "tags": {"type": "string", "description": "comma-separated tags added to every lead"},
        "source": {"type": "string", "maxLength": 200},
        "columns": {"type": "string", "description": (
            'JSON object {"<header>": "<field>"} overriding detection; fields: email, first_name, '
            "last_name, full_name, company, phone, tags, source, attributes_json, attribute, ignore")},
    },
}

PREVIEW_REQUEST = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the CSV (its first MiB is read)"},
        "columns": {"type": "string", "description": "as for /api/upload"},
        "rows": {"type": "string", "description": f"rows to show, 1-{MAX_PREVIEW_ROWS} (default {PREVIEW_ROWS})"},
    },
}

ROUTES = [
    Route("POST", "/api/upload", upload, scope="import", summary="Upload a CSV of leads and queue its import",
          request_schema=UPLOAD_REQUEST, request_content="multipart/form-data", tags=("importer",),
          responses={202: _json({"type": "object", "required": ["id", "status"],
                                 "properties": {"id": {"type": "integer"}, "status": {"type": "string"}}},
                                jobs.QUEUED),
                     413: {"description": "over the upload size cap"},
                     415: {"description": "not multipart/form-data"},
                     422: {"description": "bad form field"}}),
    Route("POST", "/api/upload/preview", upload_preview, scope="import",
          summary="Preview an upload: encoding, delimiter, proposed mapping, first rows; imports nothing",
          request_schema=PREVIEW_REQUEST, request_content="multipart/form-data", tags=("importer",),
          responses={200: _json({"type": "object", "required": ["encoding", "delimiter", "mapping", "rows"],
                                 "properties": {"encoding": {"type": "string"}, "delimiter": {"type": "string"},
                                                "mapping": {"type": "array"}, "rows": {"type": "array"}}}),
                     413: {"description": "over the upload size cap"},
                     415: {"description": "not multipart/form-data"},
                     422: {"description": "unusable file or bad columns mapping"}}),
    Route("GET", "/api/imports", list_imports, scope="read", summary="List imports", tags=("importer",),
          responses={200: _json({"type": "object", "properties": {
              "imports": {"type": "array", "items": IMPORT_SCHEMA}}})}),
    Route("GET", r"/api/imports/{id}", get_import, scope="read", summary="One import with progress",
          tags=("importer",), responses={200: _json(IMPORT_SCHEMA), 404: {"description": "unknown import"}}),
    Route("GET", r"/api/imports/{id}/errors", import_errors, scope="read",
          summary="Error report as CSV (line,reason,raw)", tags=("importer",),
          responses={200: {"description": "CSV", "content": {"text/csv": {}}},
                     404: {"description": "unknown import"}}),
    Route("POST", r"/api/imports/{id}/cancel", cancel_import, scope="import", summary="Cancel an import",
          tags=("importer",),
          responses={200: _json(IMPORT_SCHEMA, "cancelled (kept counts inside)"),
                     202: _json(IMPORT_SCHEMA, "cancel requested, worker still stopping"),
                     404: {"description": "unknown import"}, 409: {"description": "already finished"}}),
    Route("GET", "/api/upload/monitoring", upload_monitoring, scope="read",
          summary="Upload disk, files, active imports, queue and workers", tags=("importer",)),
    Route("POST", "/api/upload/cleanup", upload_cleanup, scope="import",
          summary="Remove stale upload files and requeue stuck imports", tags=("importer",),
          request_schema={"type": "object", "properties": {
              "max_age_seconds": {"type": "number", "minimum": 0, "default": 3600},
              "stuck_after_seconds": {"type": "number", "minimum": 0, "default": 1800},
              "dry_run": {"type": "boolean", "default": False}}}),
]
