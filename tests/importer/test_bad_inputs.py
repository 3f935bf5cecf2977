"""One fixture file per bad input, each with its expected counts and error rows: uploaded through
the API, imported by the job (in-process, real Postgres), checked in the tables and the report."""

from __future__ import annotations

import csv
import io
import json

import aiohttp
import pytest

from .conftest import FIXTURES, upload

# fixture -> (status, counts {inserted, updated, duplicates, invalid}, [(line, reason)], error text)
ROW_CASES = {
    "missing_email.csv": ({"inserted": 2, "invalid": 2, "duplicates": 0},
                          [(3, "missing_email"), (4, "missing_email")]),
    "invalid_syntax.csv": ({"inserted": 2, "invalid": 4, "duplicates": 0},
                           [(3, "invalid_syntax"), (4, "invalid_syntax"), (5, "invalid_syntax"),
                            (6, "invalid_syntax")]),
    "too_long.csv": ({"inserted": 1, "invalid": 2, "duplicates": 0}, [(3, "too_long"), (4, "too_long")]),
    "ragged.csv": ({"inserted": 2, "invalid": 2, "duplicates": 0}, [(3, "ragged_row"), (4, "ragged_row")]),
    "oversized_field.csv": ({"inserted": 2, "invalid": 1, "duplicates": 0}, [(3, "oversized_field")]),
    "duplicates.csv": ({"inserted": 2, "invalid": 0, "duplicates": 3},
                       [(3, "duplicate"), (5, "duplicate"), (6, "duplicate")]),
    "quoted_newlines.csv": ({"inserted": 3, "invalid": 0, "duplicates": 0}, []),
    "utf8_bom_semicolon.csv": ({"inserted": 2, "invalid": 0, "duplicates": 0}, []),
    "utf16_tab.csv": ({"inserted": 2, "invalid": 0, "duplicates": 0}, []),
    "cp1252_pipe.csv": ({"inserted": 2, "invalid": 0, "duplicates": 0}, []),
    "idn_case.csv": ({"inserted": 3, "invalid": 0, "duplicates": 1}, [(5, "duplicate")]),
}

FILE_CASES = {
    "empty.csv": "the file is empty",
    "blank_lines_only.csv": "the file is empty",
    "header_only.csv": "header row but no data rows",
    "no_email_column.csv": "no email column",
    "binary.csv": "binary",
    "nul_bytes.csv": "binary",
}


async def _import(api, job_runner, pool, name, batch_rows=50_000, **fields):
    resp = await upload(api, FIXTURES / name, filename=name, **fields)
    assert resp.status == 202, await resp.text()
    import_id = (await resp.json())["id"]
    await job_runner(import_id, batch_rows=batch_rows)
    return import_id


@pytest.mark.parametrize("name", sorted(ROW_CASES))
@pytest.mark.parametrize("batch_rows", [50_000, 2])
async def test_row_problems_become_error_rows(api, job_runner, pool, name, batch_rows):
    # Given a fixture with per-row problems; When it is imported (in one batch, or 2 rows a batch
    # so duplicates span batches)
    expected, errors = ROW_CASES[name]
    import_id = await _import(api, job_runner, pool, name, batch_rows=batch_rows)
    # Then the job completes with exact counts and one error row per problem
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", import_id)
    assert row["status"] == "completed", row["error"]
    got = {k: row[k] for k in expected}
    assert got == expected
    assert row["updated"] == 0
    assert row["processed_rows"] == row["inserted"] + row["duplicates"] + row["invalid"]
    assert row["total_rows"] == row["processed_rows"]
    assert await pool.fetchval("SELECT count(*) FROM leads WHERE import_id = $1", import_id) == expected["inserted"]
    db_errors = [(r["line"], r["reason"]) for r in await pool.fetch(
        "SELECT line, reason FROM import_errors WHERE import_id = $1 ORDER BY line", import_id)]
    assert db_errors == errors
    # and the report lists the same rows
    resp = await api.get(f"/api/imports/{import_id}/errors", headers=api.headers_)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/csv")
    report = list(csv.reader(io.StringIO(await resp.text())))
    assert report[0] == ["line", "reason", "raw"]
    assert [(int(r[0]), r[1]) for r in report[1:]] == errors
    assert all(r[2] for r in report[1:]), "every error row carries the raw text"


@pytest.mark.parametrize("name", sorted(FILE_CASES))
async def test_file_problems_fail_the_job_with_one_message(api, job_runner, pool, name):
    import_id = await _import(api, job_runner, pool, name)
    resp = await api.get(f"/api/imports/{import_id}", headers=api.headers_)
    body = await resp.json()
    assert body["status"] == "failed"
    assert FILE_CASES[name] in body["error"]
    assert await pool.fetchval("SELECT count(*) FROM leads") == 0
    assert job_runner.registry.get_sample_value("mailgenius_import_jobs_total", {"status": "failed"}) == 1


async def test_encodings_aliases_and_attributes_are_read_right(api, job_runner, pool):
    for name in ("utf8_bom_semicolon.csv", "utf16_tab.csv", "cp1252_pipe.csv", "quoted_newlines.csv"):
        await _import(api, job_runner, pool, name)
    leads = {r["email"]: r for r in await pool.fetch("SELECT * FROM leads")}
    assert leads["josé@exämple.com"]["first_name"] == "José"
    assert leads["josé@exämple.com"]["company"] == "Ñandú SA"
    assert leads["maria@example.es"]["company"] is None
    assert leads["zoë@example.de"]["last_name"] == "Müller"
    assert leads["zoë@example.de"]["phone"] == "+49 30 1234"
    assert leads["li@example.cn"]["first_name"] == "李"
    assert leads["rene@example.fr"]["company"] == "Société €uro"
    assert leads["ann@example.com"]["company"] == "Acme\nInc."
    assert leads["bob@example.com"]["company"] == 'Quote "Co"'
    import json

    assert json.loads(leads["ann@example.com"]["attributes"]) == {
        "favourite colour": "blue", "notes": "line one\nline two"}
    assert json.loads(leads["carl@example.com"]["attributes"]) == {"notes": "a,b"}
    encs = {r["filename"]: (r["encoding"], r["delimiter"]) for r in await pool.fetch("SELECT * FROM imports")}
    assert encs == {
        "utf8_bom_semicolon.csv": ("utf-8-sig", ";"),
        "utf16_tab.csv": ("utf-16", "\t"),
        "cp1252_pipe.csv": ("cp1252", "|"),
        "quoted_newlines.csv": ("utf-8", ","),
    }


async def test_normalisation_trims_lowercases_domain_and_merges_tags(api, job_runner, pool):
    await _import(api, job_runner, pool, "idn_case.csv", tags="imported, spring")
    leads = {r["email"]: r for r in await pool.fetch("SELECT * FROM leads")}
    assert set(leads) == {"Ann.Smith@example.com", "user@bücher.de", "user@xn--bcher-kva.example"}
    assert leads["Ann.Smith@example.com"]["tags"] == ["imported", "news", "spring", "vip"]
    assert leads["user@bücher.de"]["tags"] == ["imported", "spring"]


async def test_lone_carriage_returns_inside_fields_survive_copy(api, job_runner, pool):
    # a quoted field holding a bare CR (found by fuzzing): COPY CSV refuses an unquoted one
    body = b'email,first_name,notes\nann@example.com,"A\rB","\r"\nbob@example.com,Bob,x\n'
    import_id = (await (await upload(api, body)).json())["id"]
    assert await job_runner(import_id) == "completed"
    ann = await pool.fetchrow("SELECT first_name, attributes FROM leads WHERE email = 'ann@example.com'")
    assert ann["first_name"] == "A\rB"
    assert await pool.fetchval("SELECT count(*) FROM leads") == 2


async def test_tabs_backslashes_newlines_and_null_markers_survive_the_staging_copy(api, job_runner, pool):
    # the reader stages rows in COPY text format: each of these must arrive as it was in the file
    body = ("email,first_name,last_name,company,phone,tags,source,notes\n"
            'ann@example.com,"A\tB",C:\\dir\\,"two\nlines","  ",vip,  web  ,\\N\n'
            'bob@example.com,\\N,"x\ry",\t Co \t,+1,"x\\y, q""t",\\,"é\\\t"\n'
            "cy@example.com,   ,Lee,,,,,\n")
    import_id = (await (await upload(api, body.encode())).json())["id"]
    assert await job_runner(import_id) == "completed"
    leads = {r["email"]: r for r in await pool.fetch(
        "SELECT email, first_name, last_name, company, phone, tags, source, attributes::text AS a FROM leads")}
    ann, bob, cy = leads["ann@example.com"], leads["bob@example.com"], leads["cy@example.com"]
    assert (ann["first_name"], ann["last_name"], ann["company"], ann["phone"], ann["source"]) == (
        "A\tB", "C:\\dir\\", "two\nlines", None, "web")
    assert ann["tags"] == ["vip"] and json.loads(ann["a"]) == {"notes": "\\N"}
    # btrim() semantics: spaces trimmed, tabs kept; a lone "\N" is text, not NULL
    assert (bob["first_name"], bob["last_name"], bob["company"], bob["phone"]) == ("\\N", "x\ry", "\t Co \t", "+1")
    assert bob["tags"] == ['q"t', "x\\y"] and bob["source"] == "\\"
    assert json.loads(bob["a"]) == {"notes": "é\\\t"}
    assert (cy["first_name"], cy["company"], cy["source"], cy["tags"]) == (None, None, None, [])
    # the preview reads the staged rows back the same way
    data = aiohttp.FormData()
    data.add_field("file", io.BytesIO(body.encode()), filename="x.csv", content_type="text/csv")
    resp = await api.post("/api/upload/preview", data=data, headers=api.headers_)
    rows = {r["email"]: r for r in (await resp.json())["rows"]}
    assert rows["bob@example.com"]["first_name"] == "\\N" and rows["bob@example.com"]["tags"] == ['q"t', "x\\y"]
    assert rows["ann@example.com"]["company"] == "two\nlines" and rows["cy@example.com"]["first_name"] is None


async def test_header_over_the_line_cap_fails_the_import_with_the_reason(api, job_runner, pool):
    # a header of millions of columns (a 60 MB one once took the worker to 1.2 GB) fails cleanly
    body = b"email" + b",c" * (600_000) + b"\na@example.com\n"
    import_id = (await (await upload(api, body)).json())["id"]
    assert await job_runner(import_id) == "failed"
    error = await pool.fetchval("SELECT error FROM imports WHERE id = $1", import_id)
    assert "the header line is longer than 1,048,576 bytes" in error


async def test_too_many_columns_fails_the_import_with_the_reason(api, job_runner, pool):
    body = b"email" + b"".join(b",c%d" % i for i in range(3000)) + b"\na@example.com\n"
    import_id = (await (await upload(api, body)).json())["id"]
    assert await job_runner(import_id) == "failed"
    error = await pool.fetchval("SELECT error FROM imports WHERE id = $1", import_id)
    assert "the header has 3,001 columns; at most 2,000 are accepted" in error


async def test_data_line_over_the_cap_is_an_error_row_and_the_rest_imports(api, job_runner, pool):
    long_line = b"c@example.com," + b"x" * 5000 + b"\n"
    body = b"email,notes\na@example.com,1\n" + long_line + b"d@example.com,2\n"
    import_id = (await (await upload(api, body)).json())["id"]
    assert await job_runner(import_id, max_line=2048) == "completed"
    row = await pool.fetchrow("SELECT * FROM imports WHERE id = $1", import_id)
    assert (row["inserted"], row["invalid"]) == (2, 1)
    errs = await pool.fetch("SELECT line, reason, raw FROM import_errors WHERE import_id = $1", import_id)
    assert [(r["line"], r["reason"]) for r in errs] == [(3, "line_too_long")]
    assert errs[0]["raw"].startswith("c@example.com,xxx")
    assert {r["email"] for r in await pool.fetch("SELECT email FROM leads")} == {"a@example.com", "d@example.com"}
