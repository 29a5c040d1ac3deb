"""Shared fixtures: one real redis-server per session, a real tokenrelay per test module."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from broker.embedded import EmbeddedRedis
from broker.settings import Settings
from tests.graphs import GRAPHS
from tests.server import Tokenrelay


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.close()


def make_settings(redis_server: EmbeddedRedis, **overrides: object) -> Settings:
    """Settings on the session's Redis under a fresh key prefix, so tests never share keys."""
    values: dict[str, object] = {
        "redis_url": redis_server.url,
        "key_prefix": f"t{uuid.uuid4().hex[:8]}",
        "graphs": GRAPHS,
        "heartbeat_seconds": 1.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def relay(redis_server: EmbeddedRedis) -> Iterator[Tokenrelay]:
    server = Tokenrelay(make_settings(redis_server)).start()
    yield server
    server.stop()


@pytest.fixture
async def client(relay: Tokenrelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's Postgres (127.0.0.1:5432), dropped afterwards."""
    import psycopg

    admin = os.environ.get("TOKENRELAY_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
    name = f"tokenrelay_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"these tests need Postgres at {admin}: {exc}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
