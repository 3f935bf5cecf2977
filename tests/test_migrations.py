import asyncio
import uuid

import asyncpg

from mailgenius.db import migrate, migration_files, with_database


async def _fresh_db(admin_url: str) -> tuple[str, str]:
    name = f"mailgenius_mig_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return name, with_database(admin_url, name)


async def _drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def test_migrations_apply_once_and_are_idempotent(postgres_admin_url):
    name, url = await _fresh_db(postgres_admin_url)
    try:
        first = await migrate(url)
        assert first == [v for v, _, _ in migration_files()]
        assert await migrate(url) == []
        conn = await asyncpg.connect(url)
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        await conn.close()
        for t in ("leads", "imports", "import_errors", "campaigns", "messages", "email_events",
                  "links", "incidents", "api_keys", "settings", "schema_migrations"):
            assert t in tables
    finally:
        await _drop(postgres_admin_url, name)


async def test_two_concurrent_migrations_do_not_race(postgres_admin_url):
    # Given an empty database, When two processes migrate at once,
    # Then each file is applied exactly once and neither fails
    name, url = await _fresh_db(postgres_admin_url)
    try:
        a, b = await asyncio.gather(migrate(url), migrate(url))
        assert sorted(a + b) == [v for v, _, _ in migration_files()]
        conn = await asyncpg.connect(url)
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        await conn.close()
        assert count == len(migration_files())
    finally:
        await _drop(postgres_admin_url, name)


async def test_leads_unique_on_lower_email(pool):
    await pool.execute("INSERT INTO leads (email) VALUES ('Ana@Example.com')")
    try:
        await pool.execute("INSERT INTO leads (email) VALUES ('ana@example.COM')")
    except asyncpg.UniqueViolationError:
        pass
    else:
        raise AssertionError("case-variant duplicate accepted")
