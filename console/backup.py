"""``mailgenius backup`` and ``mailgenius restore``: everything needed to recover, in one file.

A backup is an uncompressed tar (the dump inside is already compressed) holding:

- ``MANIFEST.json``: format, creation time, what is inside and where the files came from;
- ``database.dump``: ``pg_dump --format=custom`` of the database, checked with
  ``pg_restore --list`` before it is archived;
- ``uploads/<path>``: the upload files of queued or running imports (Postgres only knows their
  path; without them those imports cannot finish after a restore);
- ``secrets/resend-webhook-secret``: the webhook secret ``make run`` generated (when it did), so
  signed events keep verifying after a restore.

The archive is written to a temporary file created with mode 0600 in the target folder and
renamed into place only when complete, so a reader never sees a partial backup and no other
user can read one. The database password never appears on a command line: it goes to pg_dump and
pg_restore in ``PGPASSWORD``. ``docs/recovery.md`` describes the procedures.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlunparse

from .base import OpsError
from .stack import RUN_SUBDIR, ops_settings

FORMAT = 1
DUMP_NAME = "database.dump"
MANIFEST = "MANIFEST.json"
SECRET_NAMES = ("resend-webhook-secret",)


def libpq_target(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its password, the environment carrying it as PGPASSWORD)."""
    parts = urlparse(url)
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    query = parse_qsl(parts.query, keep_blank_values=True)
    password = parts.password
    kept = []
    for key, value in query:
        if key == "password":
            password = value
        else:
            kept.append((key, value))
    netloc = parts.hostname or ""
    if parts.hostname and ":" in parts.hostname:  # IPv6 literal
        netloc = f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    if password:
        env["PGPASSWORD"] = unquote(password)
    return urlunparse(parts._replace(netloc=netloc, query=urlencode(kept))), env


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise OpsError(f"{name} not found: install the Debian package postgresql-client", 2)
    return path


async def _active_uploads(database_url: str) -> list[tuple[int, str]]:
    import asyncpg

    from mailgenius.import_states import ACTIVE, sql_list

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(f"SELECT id, path FROM imports WHERE status IN {sql_list(ACTIVE)} AND path IS NOT NULL")
        return [(r["id"], r["path"]) for r in rows]
    finally:
        await conn.close()


def _private_file(path: Path):
    """Create ``path`` with mode 0600 whatever the umask (fails if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def write_backup(settings, out: Path, *, data_dir: Path) -> dict:
    """Dump the database and the files it needs into the tar ``out``; returns the manifest."""
    pg_dump, pg_restore = _tool("pg_dump"), _tool("pg_restore")
    target, env = libpq_target(settings.database_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mailgenius-backup-") as work:  # mode 0700
        dump = Path(work) / DUMP_NAME
        proc = subprocess.run([pg_dump, "--format=custom", "--no-owner", f"--file={dump}", "--dbname", target],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise OpsError(f"pg_dump failed: {proc.stderr.strip()}")
        listing = subprocess.run([pg_restore, "--list", str(dump)], capture_output=True, text=True)
        if listing.returncode != 0:
            raise OpsError(f"the dump does not read back (pg_restore --list): {listing.stderr.strip()}")
        tables = sum(1 for line in listing.stdout.splitlines() if " TABLE DATA " in line)
        try:
            uploads = asyncio.run(_active_uploads(settings.database_url))
        except Exception as exc:  # noqa: BLE001 - the dump itself worked: say what is missing
            raise OpsError(f"could not list the uploads of unfinished imports: {exc}") from None
        upload_root = Path(settings.upload_dir).resolve()
        manifest = {"format": FORMAT, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "database": DUMP_NAME, "tables": tables, "upload_dir": str(upload_root), "uploads": [],
                    "missing_uploads": [], "secrets": []}
        tmp = out.with_name(f".{out.name}.partial")
        tmp.unlink(missing_ok=True)
        try:
            with _private_file(tmp) as fh, tarfile.open(fileobj=fh, mode="w") as tar:
                tar.add(dump, arcname=DUMP_NAME)
                for import_id, raw in uploads:
                    path = Path(raw)
                    if not path.is_file():
                        manifest["missing_uploads"].append({"import_id": import_id, "path": raw})
                        continue
                    real = path.resolve()
                    rel = real.relative_to(upload_root) if real.is_relative_to(upload_root) else Path(f"import-{import_id}") / real.name
                    tar.add(real, arcname=f"uploads/{rel}")
                    manifest["uploads"].append({"import_id": import_id, "path": raw, "member": f"uploads/{rel}"})
                for name in SECRET_NAMES:
                    secret = data_dir / RUN_SUBDIR / name
                    if secret.is_file():
                        tar.add(secret, arcname=f"secrets/{name}")
                        manifest["secrets"].append(name)
                body = json.dumps(manifest, indent=1).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mtime, info.mode = len(body), int(time.time()), 0o600
                tar.addfile(info, io.BytesIO(body))
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    manifest["seconds"] = time.monotonic() - start
    return manifest


def cmd_backup(args) -> int:
    settings = ops_settings()
    data_dir = Path(settings.data_dir)
    if args.out:
        out = Path(args.out)
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        out = Path(args.dir or data_dir / "backups") / f"mailgenius-{stamp}.tar"
    manifest = write_backup(settings, out, data_dir=data_dir)
    print(f"backup: wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, mode 0600, {manifest['tables']} tables, "
          f"{len(manifest['uploads'])} upload file(s) of unfinished imports, {len(manifest['secrets'])} secret(s), "
          f"{manifest['seconds']:.1f} s); restore with: mailgenius restore {out}")
    for miss in manifest["missing_uploads"]:
        print(f"backup: warning: the upload of import {miss['import_id']} is missing on disk ({miss['path']})")
    if args.keep:
        backups = sorted([*out.parent.glob("mailgenius-*.tar"), *out.parent.glob("mailgenius-*.dump")],
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in backups[args.keep:]:
            old.unlink()
            print(f"backup: removed old {old}")
    return 0


# -- restore ----------------------------------------------------------------------------------


async def _user_tables(url: str) -> list[str]:
    import asyncpg

    from mailgenius.db import ensure_database

    await ensure_database(url)
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT schemaname || '.' || relname AS name FROM pg_stat_user_tables ORDER BY 1")
        return [r["name"] for r in rows]
    finally:
        await conn.close()


async def _lead_count(url: str) -> int | None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval("SELECT count(*) FROM leads")
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    out = {}
    for info in tar.getmembers():
        name = info.name
        if not info.isfile() or name.startswith("/") or ".." in Path(name).parts:
            raise OpsError(f"the backup holds an unexpected member {name!r}: refusing it", 2)
        out[name] = info
    return out


def restore(path: Path, database_url: str, *, force: bool, upload_dir: Path, data_dir: Path, out=print) -> dict:
    pg_restore = _tool("pg_restore")
    if not path.is_file():
        raise OpsError(f"{path}: no such backup file", 2)
    tables = asyncio.run(_user_tables(database_url))
    if tables and not force:
        raise OpsError(f"the target database is not empty ({len(tables)} tables, e.g. {', '.join(tables[:3])}); "
                       "restore into an empty database, or add --force to replace its contents", 2)
    target, env = libpq_target(database_url)
    summary = {"uploads": 0, "secrets": 0, "skipped": []}
    with tempfile.TemporaryDirectory(prefix="mailgenius-restore-") as work:
        work_dir = Path(work)
        manifest: dict = {}
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                members = _members(tar)
                if MANIFEST not in members or DUMP_NAME not in members:
                    raise OpsError(f"{path}: not a mailgenius backup (no {MANIFEST} or {DUMP_NAME})", 2)
                manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
                if manifest.get("format") != FORMAT:
                    raise OpsError(f"{path}: backup format {manifest.get('format')!r} is not supported", 2)
                tar.extractall(work_dir, members=list(members.values()), filter="data")
            dump = work_dir / DUMP_NAME
        else:  # a bare pg_dump custom-format file (older backups)
            dump = path
        listing = subprocess.run([pg_restore, "--list", str(dump)], capture_output=True, text=True)
        if listing.returncode != 0:
            raise OpsError(f"{path}: the database dump does not read (pg_restore --list): {listing.stderr.strip()}", 2)
        argv = [pg_restore, "--no-owner", "--exit-on-error", "--single-transaction", "--dbname", target]
        if tables:
            argv += ["--clean", "--if-exists"]
        start = time.monotonic()
        proc = subprocess.run([*argv, str(dump)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise OpsError(f"pg_restore failed (nothing was changed: one transaction): {proc.stderr.strip()}")
        summary["seconds"] = time.monotonic() - start
        for item in manifest.get("uploads", []):
            src = work_dir / item["member"]
            dest = Path(item["path"])
            if not dest.is_absolute():
                dest = upload_dir / dest
            if dest.exists() and not force:
                summary["skipped"].append(str(dest))
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            summary["uploads"] += 1
        for name in manifest.get("secrets", []):
            dest = data_dir / RUN_SUBDIR / name
            if dest.exists() and not force:
                summary["skipped"].append(str(dest))
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            with _private_file(dest) as fh:
                fh.write((work_dir / "secrets" / name).read_bytes())
            summary["secrets"] += 1
    summary["leads"] = asyncio.run(_lead_count(database_url))
    summary["created"] = manifest.get("created")
    return summary


def cmd_restore(args) -> int:
    settings = ops_settings()
    url = args.database_url or settings.database_url
    summary = restore(Path(args.file), url, force=args.force, upload_dir=Path(settings.upload_dir),
                      data_dir=Path(settings.data_dir))
    print(f"restore: {args.file} (made {summary['created'] or 'unknown'}) restored into "
          f"{libpq_target(url)[0]} in {summary['seconds']:.1f} s: {summary['leads']} leads, "
          f"{summary['uploads']} upload file(s), {summary['secrets']} secret(s)")
    for skipped in summary["skipped"]:
        print(f"restore: kept the existing {skipped} (add --force to overwrite)")
    return 0
