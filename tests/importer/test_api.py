"""The importer HTTP API on real Postgres and Redis: upload limits and validation, reads,
the error report's escaping, cancel of a queued import, monitoring, cleanup, health, metrics."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time

import pytest
from prometheus_client import CollectorRegistry

from importer.app import create_app
from importer.routes import escape_cell
from tests.conftest import bearer

from .conftest import FIXTURES, upload

CSV = b"email,first_name\nann@example.com,Ann\nbob@example.com,Bob\n"


async def test_upload_stores_file_queues_job_and_counts_bytes(api, pool, settings):
    resp = await upload(api, CSV, mode="update", tags="spring, vip,spring", source="fair")
    assert resp.status == 202
    body = await resp.json()
    assert body["status"] == "queued"
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", body["id"])
    assert row["bytes"] == len(CSV)
    assert row["sha256"] == hashlib.sha256(CSV).hexdigest()
    assert (row["mode"], row["tags"], row["source"]) == ("update", ["spring", "vip"], "fair")
    with open(row["path"], "rb") as f:
        assert f.read() == CSV
    assert api.registry.get_sample_value("mailgenius_upload_bytes_total") == len(CSV)
    # the job message is on the lead-import queue (Redis broker, our test namespace)
    resp = await api.get("/api/upload/monitoring", headers=api.headers_)
    mon = await resp.json()
    assert mon["queue"]["waiting"] >= 1
    assert mon["files"]["count"] == 1 and mon["files"]["bytes"] == len(CSV)
    assert [a["id"] for a in mon["active"]] == [body["id"]]


async def test_over_the_cap_is_413_json_and_leaves_nothing(aiohttp_client, settings, pool, make_key):
    small = settings.replace(upload_max_bytes=10_000)
    client = await aiohttp_client(create_app(small, registry=CollectorRegistry()))
    client.headers_ = bearer(await make_key("import"))
    for size in (12_000, 400_000):  # streamed past the cap / refused from Content-Length
        body = b"email\n" + b"x@example.com\n" * (size // 14)
        resp = await upload(client, body)
        assert resp.status == 413
        err = (await resp.json())["error"]
        assert err["code"] == "payload_too_large" and "10000" in err["message"]
    assert os.listdir(small.upload_dir) == []
    assert await pool.fetchval("SELECT count(*) FROM imports") == 0
    # at the cap exactly is fine
    resp = await upload(client, b"email\n" + b"a" * (10_000 - 6))
    assert resp.status == 202


@pytest.mark.parametrize("fields,code", [
    ({"mode": "merge"}, "invalid_mode"),
    ({"tags": "x" * 70}, "validation_error"),
])
async def test_bad_form_fields_are_422(api, pool, fields, code):
    resp = await upload(api, CSV, **fields)
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == code
    assert await pool.fetchval("SELECT count(*) FROM imports") == 0


async def test_upload_needs_multipart_file_and_import_scope(api, make_key):
    resp = await api.post("/api/upload", json={"file": "nope"}, headers=api.headers_)
    assert resp.status == 415
    import aiohttp

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("mode", "skip")
    form.add_field("other", "x")
    resp = await api.post("/api/upload", data=form, headers=api.headers_)
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "missing_file"
    resp = await api.post("/api/upload", data=form)
    assert resp.status == 401
    reader = await make_key("read")
    resp = await api.post("/api/upload", data=form, headers=bearer(reader))
    assert resp.status == 403


async def test_reads_and_unknown_ids(api, job_runner, pool):
    ids = []
    for _ in range(3):
        ids.append((await (await upload(api, CSV)).json())["id"])
    await job_runner(ids[0])
    resp = await api.get(f"/api/imports/{ids[0]}", headers=api.headers_)
    view = await resp.json()
    for k in ("id", "status", "filename", "bytes", "total_rows", "processed_rows", "inserted", "updated",
              "duplicates", "invalid", "rows_per_second", "eta_seconds", "error"):
        assert k in view
    assert (view["status"], view["inserted"], view["total_rows"], view["eta_seconds"]) == ("completed", 2, 2, 0)
    assert view["rows_per_second"] > 0
    lst = await (await api.get("/api/imports?limit=2", headers=api.headers_)).json()
    assert [i["id"] for i in lst["imports"]] == [ids[2], ids[1]]
    lst = await (await api.get("/api/imports?status=completed", headers=api.headers_)).json()
    assert [i["id"] for i in lst["imports"]] == [ids[0]]
    for path in ("/api/imports/999999", "/api/imports/abc", "/api/imports/99999999999999999999999/errors"):
        resp = await api.get(path, headers=api.headers_)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] in ("not_found",)
    assert (await api.get("/api/imports?limit=0", headers=api.headers_)).status == 422


def test_escape_cell():
    for bad in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert escape_cell(bad) == "'" + bad
    assert escape_cell("ok@example.com") == "ok@example.com"
    assert escape_cell("") == ""


async def test_error_report_escapes_formula_cells(api, job_runner, pool):
    import_id = (await (await upload(api, FIXTURES / "formula.csv")).json())["id"]
    await job_runner(import_id)
    text = await (await api.get(f"/api/imports/{import_id}/errors", headers=api.headers_)).text()
    rows = list(csv.reader(io.StringIO(text)))[1:]
    raws = [r[2] for r in rows]
    assert raws == ["'=HYPERLINK(\"http://x\"),evil", "'+1234,plus", "'-5,minus", "'@SUM(A1),at", "'\tTAB,tab"]
    assert all(r[1] == "invalid_syntax" for r in rows)
    # the stored raw text is the original; only the report escapes it
    stored = await pool.fetchval("SELECT raw FROM import_errors WHERE import_id = $1 ORDER BY line LIMIT 1", import_id)
    assert stored.startswith("=HYPERLINK")


async def test_cancel_queued_import_and_finished_is_409(api, job_runner, pool):
    iid = (await (await upload(api, CSV)).json())["id"]
    resp = await api.post(f"/api/imports/{iid}/cancel", headers=api.headers_)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "cancelled"
    assert body["kept"] == {"processed_rows": 0, "inserted": 0, "updated": 0, "duplicates": 0, "invalid": 0}
    # the worker picking the message later leaves it alone
    assert await job_runner(iid) == "cancelled"
    assert await pool.fetchval("SELECT count(*) FROM leads") == 0
    resp = await api.post(f"/api/imports/{iid}/cancel", headers=api.headers_)
    assert resp.status == 409
    assert (await api.post("/api/imports/424242/cancel", headers=api.headers_)).status == 404


async def test_cleanup_removes_stale_files_and_requeues_stuck_imports(api, pool, settings):
    iid = (await (await upload(api, CSV)).json())["id"]
    os.makedirs(settings.upload_dir, exist_ok=True)
    stale = os.path.join(settings.upload_dir, "dead.upload.tmp")
    fresh = os.path.join(settings.upload_dir, "fresh.upload.tmp")
    for p in (stale, fresh):
        with open(p, "wb") as f:
            f.write(b"x" * 100)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    path = await pool.fetchval("SELECT path FROM imports WHERE id = $1", iid)
    os.utime(path, (old, old))  # old, but its import is still queued: kept
    await pool.execute("UPDATE imports SET updated_at = now() - interval '2 hours' WHERE id = $1", iid)
    waiting = (await (await api.get("/api/upload/monitoring", headers=api.headers_)).json())["queue"]["waiting"]
    resp = await api.post("/api/upload/cleanup", json={"dry_run": True}, headers=api.headers_)
    body = await resp.json()
    assert body["removed_files"] == ["dead.upload.tmp"] and body["requeued"] == [iid]
    assert os.path.exists(stale)
    resp = await api.post("/api/upload/cleanup", headers=api.headers_)
    body = await resp.json()
    assert resp.status == 200
    assert body == {"removed_files": ["dead.upload.tmp"], "freed_bytes": 100, "requeued": [iid], "dry_run": False}
    assert not os.path.exists(stale) and os.path.exists(fresh) and os.path.exists(path)
    mon = await (await api.get("/api/upload/monitoring", headers=api.headers_)).json()
    assert mon["queue"]["waiting"] == waiting + 1  # the requeued message
    resp = await api.post("/api/upload/cleanup", json={"max_age_seconds": "soon"}, headers=api.headers_)
    assert resp.status == 422


async def test_health_has_queue_upload_and_workers_checks(api):
    resp = await api.get("/api/health", headers=api.headers_)
    body = await resp.json()
    assert set(body["checks"]) >= {"database", "redis", "queue", "upload", "workers"}
    assert body["checks"]["upload"]["status"] == "healthy"
    assert "GiB free" in body["checks"]["upload"]["detail"]
    # no worker in this test: degraded (not down), the API still takes uploads
    assert body["checks"]["workers"]["status"] == "degraded"
    one = await api.get("/api/health/upload")
    assert one.status == 200 and (await one.json())["status"] == "healthy"


async def test_openapi_lists_the_importer_routes(api):
    doc = await (await api.get("/api/openapi.json")).json()
    for path in ("/api/upload", "/api/imports", "/api/imports/{id}", "/api/imports/{id}/errors",
                 "/api/imports/{id}/cancel", "/api/upload/monitoring", "/api/upload/cleanup"):
        assert path in doc["paths"], path
    assert "multipart/form-data" in doc["paths"]["/api/upload"]["post"]["requestBody"]["content"]
