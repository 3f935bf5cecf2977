"""`mailgenius backup` and `mailgenius restore` with the real pg_dump/pg_restore and the test
Postgres: a round trip keeps lead counts and a checksum of every lead equal, and brings back the
upload files of unfinished imports and the generated webhook secret; the archive is mode 0600 and
never partial; the password never reaches pg_dump's command line; a non-empty target is refused
unless --force."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import asyncpg
import pytest

from console.backup import libpq_target
from mailgenius.db import with_database
from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parents[2]
MAILGENIUS = str(Path(sys.executable).parent / "mailgenius")
CHECKSUM = "SELECT count(*), md5(coalesce(string_agg(l::text, '|' ORDER BY id), '')) FROM leads l"


def cli(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([MAILGENIUS, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def scratch_db(database_url):
    """The name of a database that does not exist yet (dropped afterwards)."""
    name = f"mgrestore_{uuid.uuid4().hex[:8]}"
    url = with_database(database_url, name)
    yield url

    async def drop():
        conn = await asyncpg.connect(with_database(database_url, "postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


async def _seed(pool, upload: Path) -> None:
    await pool.execute("INSERT INTO leads (email, first_name, tags, attributes) "
                       "SELECT 'lead' || i || '@example.com', 'Ana ' || i, ARRAY['t' || (i % 3)], "
                       "jsonb_build_object('n', i) FROM generate_series(1, 500) i")
    await pool.execute("INSERT INTO imports (filename, path, status) VALUES ('a.csv', $1, 'running')", str(upload))


async def _checksum(url: str):
    conn = await asyncpg.connect(url)
    try:
        return tuple(await conn.fetchrow(CHECKSUM))
    finally:
        await conn.close()


async def test_round_trip_restores_leads_uploads_and_secrets(settings, pool, scratch_db, tmp_path):
    # Given leads, a running import with its upload file, and the generated webhook secret
    upload = Path(settings.upload_dir) / "2026" / "a.csv"
    upload.parent.mkdir(parents=True)
    upload.write_text("email\nx@example.com\n")
    await _seed(pool, upload)
    secret = Path(settings.data_dir) / "run" / "resend-webhook-secret"
    secret.parent.mkdir(parents=True)
    secret.write_text("whsec_YmFja3VwLXJvdW5kLXRyaXAtc2VjcmV0\n")
    before = await _checksum(settings.database_url)
    assert before[0] == 500
    env = cli_env(settings)
    # When backing up
    out = tmp_path / "b" / "one.tar"
    res = cli("backup", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    # Then one private file holds the dump, the upload and the secret, and nothing partial is left
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["one.tar"]
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("MANIFEST.json").read())
    assert {"MANIFEST.json", "database.dump", "uploads/2026/a.csv", "secrets/resend-webhook-secret"} <= names
    assert manifest["uploads"][0]["path"] == str(upload)
    # When the machine is lost (files gone) and the backup is restored into an empty database
    upload.unlink()
    secret.unlink()
    res = cli("restore", str(out), "--database-url", scratch_db, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "500 leads" in res.stdout
    # Then counts and the checksum of every lead are equal, and the files are back
    assert await _checksum(scratch_db) == before
    assert upload.read_text() == "email\nx@example.com\n"
    assert secret.read_text() == "whsec_YmFja3VwLXJvdW5kLXRyaXAtc2VjcmV0\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600


async def test_restore_refuses_a_non_empty_database_unless_forced(settings, pool, tmp_path):
    await pool.execute("INSERT INTO leads (email) VALUES ('only@example.com')")
    env = cli_env(settings)
    out = tmp_path / "b.tar"
    assert cli("backup", "--out", str(out), env=env).returncode == 0
    before = await _checksum(settings.database_url)
    # the session database has tables: refused, nothing changed
    res = cli("restore", str(out), env=env)
    assert res.returncode == 2
    assert "not empty" in res.stderr and "--force" in res.stderr and "Traceback" not in res.stderr
    # a row added after the backup...
    await pool.execute("INSERT INTO leads (email) VALUES ('later@example.com')")
    # ...is gone after a forced restore: the database is the backup's again
    res = cli("restore", str(out), "--force", env=env)
    assert res.returncode == 0, res.stderr
    assert await _checksum(settings.database_url) == before


def test_restore_refuses_what_is_not_a_backup(settings, tmp_path):
    env = cli_env(settings)
    missing = cli("restore", str(tmp_path / "nope.tar"), "--database-url", settings.database_url, env=env)
    assert missing.returncode == 2 and "no such backup file" in missing.stderr
    junk = tmp_path / "junk.tar"
    with tarfile.open(junk, "w") as tar:
        (tmp_path / "x").write_text("x")
        tar.add(tmp_path / "x", arcname="x")
    res = cli("restore", str(junk), "--database-url", settings.database_url, "--force", env=env)
    assert res.returncode == 2 and "not a mailgenius backup" in res.stderr


def test_the_password_goes_to_pg_dump_in_the_environment_not_its_arguments(settings, tmp_path):
    # a pg_dump in front of the real one records its arguments and PGPASSWORD, then runs it
    real = subprocess.run(["sh", "-c", "command -v pg_dump"], capture_output=True, text=True).stdout.strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record.txt"
    (bindir / "pg_dump").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" > {record}\necho "PGPASSWORD=$PGPASSWORD" >> {record}\n'
                                    f'exec {real} "$@"\n')
    (bindir / "pg_dump").chmod(0o755)
    url = settings.database_url.replace("postgres@", "postgres:S3cret%2Fpw@", 1)  # trust auth ignores it
    assert "S3cret" in url
    env = cli_env(settings, DATABASE_URL=url, PATH=f"{bindir}:{os.environ['PATH']}")
    res = cli("backup", "--out", str(tmp_path / "p.tar"), env=env)
    assert res.returncode == 0, res.stderr
    args, pw = record.read_text().splitlines()
    assert "S3cret" not in args and "--dbname" in args
    assert pw == "PGPASSWORD=S3cret/pw"


def test_libpq_target_strips_the_password():
    url, env = libpq_target("postgresql://u:p%40ss@db.example:5433/mg?sslmode=require")
    assert url == "postgresql://u@db.example:5433/mg?sslmode=require" and env["PGPASSWORD"] == "p@ss"
    url, env = libpq_target("postgresql://u@h/mg?password=x&sslmode=disable")
    assert url == "postgresql://u@h/mg?sslmode=disable" and env["PGPASSWORD"] == "x"
