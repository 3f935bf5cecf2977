"""Test harness: real Postgres and Redis.

Each test session gets its own freshly created database (dropped at the end) and its own Redis
key prefix. Where nothing answers locally but a Docker engine does, testcontainers starts the
services; with ``CI`` set and neither, the session fails loudly instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

import asyncpg
import pytest
import redis

from mailgenius.db import migrate, with_database
from mailgenius.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))

#: tables emptied before each test that asks for a clean database
TABLES = ("email_events", "messages", "links", "campaigns", "import_errors", "imports", "leads",
          "incidents", "api_keys", "settings",
          # the sender's side tables of messages (0201): no foreign key, so CASCADE misses them
          "message_provider_ids", "message_failures", "message_refusals")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def unavailable(what: str) -> None:
    """Skip locally, fail in CI: a skipped suite is not a green suite."""
    msg = f"{what} is not reachable and no Docker engine answers"
    if IN_CI:
        pytest.fail(msg + " (CI is set: failing instead of skipping)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return load_settings(os.environ)


@pytest.fixture(scope="session")
def postgres_admin_url(base_settings):
    url = base_settings.database_url
    p = urlparse(url)
    if _reachable(p.hostname or "127.0.0.1", p.port or 5432):
        yield with_database(url, "postgres")
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as pg:
            yield with_database(pg.get_connection_url(), "postgres")
        return
    unavailable(f"PostgreSQL at {p.hostname}:{p.port}")


@pytest.fixture(scope="session")
def database_url(postgres_admin_url):
    """A fresh, migrated database for this test session; dropped at the end."""
    name = f"mailgenius_test_{uuid.uuid4().hex[:10]}"
    url = with_database(postgres_admin_url, name)

    async def create():
        conn = await asyncpg.connect(postgres_admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate(url)

    async def drop():
        conn = await asyncpg.connect(postgres_admin_url)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    yield url
    asyncio.run(drop())


@pytest.fixture(scope="session")
def redis_url(base_settings):
    url = base_settings.redis_url
    p = urlparse(url)
    if _reachable(p.hostname or "127.0.0.1", p.port or 6379):
        yield url
        return
    if _docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as rc:
            yield f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
        return
    unavailable(f"Redis at {p.hostname}:{p.port}")


@pytest.fixture(scope="session")
def redis_prefix(redis_url):
    """An isolated key namespace for this session; its keys are deleted at the end."""
    prefix = f"mgtest-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def settings(database_url, redis_url, redis_prefix, tmp_path) -> Settings:
    return load_settings(os.environ).replace(
        database_url=database_url,
        redis_url=redis_url,
        # MAILGENIUS_TEST_BROKER_URL=amqp://guest:guest@127.0.0.1:5672/ runs the suites on RabbitMQ
        broker_url=os.environ.get("MAILGENIUS_TEST_BROKER_URL") or redis_url,
        # one namespace per test (under the session's, so its clean-up still finds every key):
        # queued messages, worker heartbeats and caches a test leaves behind never reach the next
        redis_prefix=f"{redis_prefix}-{uuid.uuid4().hex[:6]}",
        upload_dir=str(tmp_path / "uploads"),
        sink_dir=str(tmp_path / "sink"),
        data_dir=str(tmp_path / "var"),
        health_timeout=1.0,
    )


@pytest.fixture
async def pool(database_url):
    """A pool on the session database, emptied of rows first."""
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    await p.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    yield p
    await p.close()


@pytest.fixture
async def make_key(pool):
    """Create an API key with the given scopes; returns the key string."""
    from mailgenius import auth

    async def make(*scopes: str) -> str:
        async with pool.acquire() as conn:
            _id, key = await auth.create_key(conn, list(scopes) or ["read"], "test")
        return key

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def cli_env(settings, **extra) -> dict[str, str]:
    """The environment of a `mailgenius` child process on the test settings: the caller's
    environment without its MAILGENIUS_* variables, the test's database, Redis, broker, prefix
    and directories, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGENIUS_")}
    env.update({"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
                "BROKER_URL": settings.broker_url, "MAILGENIUS_REDIS_PREFIX": settings.redis_prefix,
                "MAILGENIUS_DATA_DIR": settings.data_dir, "MAILGENIUS_UPLOAD_DIR": settings.upload_dir})
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stack(settings, tmp_path):
    """The real stack in subprocesses on free ports (tests/stack.py); stopped at teardown."""
    from tests.stack import Stack

    st = Stack(settings, tmp_path)
    yield st
    st.stop_all()
