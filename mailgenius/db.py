"""Postgres: the asyncpg pool lifecycle and the ordered SQL migrations.

Migrations are ``migrations/NNNN_name.sql``, applied in numeric order, one transaction each,
recorded in ``schema_migrations``, under an advisory lock so that two processes starting at once
apply each file exactly once. Number ranges keep packages out of each other's way:
0001-0099 kernel, 0100-0199 importer, 0200-0299 sender, 0300-0399 exporter.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import asyncpg

log = logging.getLogger(__name__)

#: Where the SQL files live.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: Advisory lock key taken while migrating (any constant unique to this app).
MIGRATION_LOCK_KEY = 0x6D61696C67656E  # "mailgen"

#: Statement timeout of the API services' pools (pool_ctx), seconds. Their queries are reads by
#: key and small writes (milliseconds); when Postgres stops answering (a blackholed network, a
#: hung server) a request must get its 503 JSON within ~1.5 s, not after 30 s. A statement that
#: times out terminates its connection (TimeoutSafeConnection): the pool never hands it out again.
API_COMMAND_TIMEOUT = 1.0
#: Connect timeout of the API services' pools, seconds (a local connect takes ~10 ms; a
#: blackholed server accepts the TCP connection and never answers the startup).
API_CONNECT_TIMEOUT = 1.0
#: For the few long statements an API process runs (retry-failed over a big campaign, a large
#: cancellation chunk): pass ``timeout=LONG_COMMAND_TIMEOUT`` to that call. Workers, migrations
#: and the CLI use their own pools with the long default.
LONG_COMMAND_TIMEOUT = 30.0
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, Path]]:
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), m.group(2), path))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migrations share a number in {directory}")
    return found


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    conn = await asyncpg.connect(dsn, timeout=10)
    applied_now: list[int] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, name, path in migration_files(directory):
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                    )
                log.info("migration applied", extra={"version": version, "migration": name})
                applied_now.append(version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    return applied_now


def with_database(dsn: str, database: str) -> str:
    p = urlparse(dsn)
    return urlunparse(p._replace(path="/" + database))


def database_name(dsn: str) -> str:
    return urlparse(dsn).path.lstrip("/") or "postgres"


async def ensure_database(dsn: str) -> bool:
    """Create the database named in the DSN when it does not exist; True when created."""
    name = database_name(dsn)
    admin = await asyncpg.connect(with_database(dsn, "postgres"), timeout=10)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await admin.close()


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10,
                      command_timeout: float = 30.0) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout, timeout=5
    )


class TimeoutSafeConnection(asyncpg.Connection):
    """A connection that terminates itself when a statement times out.

    A statement that timed out leaves the connection mid-protocol: asyncpg then sends a cancel
    request and the pool's release waits for it, which on a silent (blackholed) server means the
    request hangs on past its timeout. Terminated instead, the release is immediate and the pool
    opens a fresh connection for the next request (measured through the fault proxy: a pooled
    read answers its TimeoutError after 1.0 s instead of 2.0 s, and no later request inherits the
    dead connection).
    """

    __slots__ = ()

    async def _discard_on_timeout(self, call):
        try:
            return await call
        except TimeoutError:
            if not self.is_closed():
                log.warning("Postgres statement timed out; connection discarded")
                self.terminate()
            raise

    async def _execute(self, *args, **kwargs):
        return await self._discard_on_timeout(super()._execute(*args, **kwargs))

    async def execute(self, *args, **kwargs):
        return await self._discard_on_timeout(super().execute(*args, **kwargs))

    async def _executemany(self, *args, **kwargs):
        return await self._discard_on_timeout(super()._executemany(*args, **kwargs))


class ServiceConnection(TimeoutSafeConnection):
    """The connections of a service's pool: they can be marked *clean* (used for nothing but
    one plain read since they left the pool), which lets :func:`_reset_unless_clean` skip the
    reset round trip on release."""

    __slots__ = ("_mg_clean",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mg_clean = False

    def mark_clean(self) -> None:
        self._mg_clean = True


async def _reset_unless_clean(conn: ServiceConnection) -> None:
    """The pool's reset: asyncpg has already rolled back any open transaction and dropped the
    listeners; the default reset *query* (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) is
    one more round trip per release, which doubled the client CPU of a one-row read (measured:
    151 vs 72 µs). It is skipped only for a connection :func:`fetchrow_read` marked clean."""
    if conn._mg_clean:
        conn._mg_clean = False
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


async def fetchrow_read(pool: asyncpg.Pool, query: str, *args):
    """``pool.fetchrow`` for one plain SELECT written in this repository (no set_config, no
    advisory lock, no cursor): it cannot change the session, so the connection goes back to
    the pool without the reset round trip. Hot read paths (API keys, reads by id, health)."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(query, *args)
        mark = getattr(conn, "mark_clean", None)  # a pool not made by pool_ctx: plain reset
        if mark is not None:
            mark()
    return row


class ReadOnlyPool:
    """A pool seen through :func:`fetchrow_read`, for domain functions that take a pool and
    only call ``fetchrow`` with a plain SELECT."""

    __slots__ = ("pool",)

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def fetchrow(self, query: str, *args):
        return await fetchrow_read(self.pool, query, *args)


def pool_ctx(settings, key, *, command_timeout: float = API_COMMAND_TIMEOUT,
             connect_timeout: float = API_CONNECT_TIMEOUT):
    """aiohttp cleanup_ctx: open the pool before start, close it after stop.

    The pool opens lazily (min_size=0 reconnects) so a service starts, and reports unhealthy,
    while Postgres is down instead of refusing to start. Short statement and connect timeouts
    (API_COMMAND_TIMEOUT, API_CONNECT_TIMEOUT): an unreachable Postgres is a 503 within ~1.5 s
    (the kernel's error middleware maps TimeoutError to 503 ``unavailable``).
    """

    async def ctx(app) -> AsyncIterator[None]:
        pool = asyncpg.create_pool(
            settings.database_url,
            min_size=0,
            max_size=settings.db_pool_max,
            command_timeout=command_timeout,
            timeout=connect_timeout,
            connection_class=ServiceConnection,
            reset=_reset_unless_clean,
        )
        try:
            await pool  # connects min_size (0) connections: never fails on a down server
        except Exception:  # pragma: no cover - defensive
            log.exception("could not initialise the Postgres pool")
        app[key] = pool
        try:
            yield
        finally:
            await pool.close()

    return ctx
