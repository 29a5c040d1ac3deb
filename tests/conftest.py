"""Shared fixtures: one real redis-server per session (and a real 3-master Redis Cluster for the
tests that also run on one), a real tokenrelay per test module.

A test runs on the standalone Redis; mark it (or its module) ``@pytest.mark.redis("standalone",
"cluster")`` to run it on both, with ``[standalone]`` or ``[cluster]`` in its id. The cluster
starts on first use.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from tests.graphs import GRAPHS
from tests.server import Tokenrelay, stop_leftovers
from tokenrelay.api import serving
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.embedded import EmbeddedCluster, EmbeddedRedis, free_port
from tokenrelay.broker.settings import Settings

RedisServer = EmbeddedRedis | EmbeddedCluster


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("redis")
    if marker is not None and "redis_server" in metafunc.fixturenames:
        # Module scope: each module's fixtures (its tokenrelay) start once per kind of Redis.
        metafunc.parametrize("redis_server", marker.args, indirect=True, scope="module")


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, for a test that restarts, kills or counts on it."""
    server = EmbeddedRedis(port=free_port()).start()
    yield server
    server.close()


@pytest.fixture
def fanout_writes(monkeypatch: pytest.MonkeyPatch) -> dict[bool, int]:
    """How many live chunks the fan-out wrote to waiting readers (`serving.write_now`: True)
    and how many it left to them (False), in the servers of this test's process."""
    counts = {True: 0, False: 0}
    write_now = serving.write_now

    def counted(cycle: Any, chunk: bytes) -> bool:
        done = write_now(cycle, chunk)
        counts[done] += 1
        return done

    monkeypatch.setattr(serving, "write_now", counted)
    return counts


@pytest.fixture(scope="session", autouse=True)
def stop_leftover_processes() -> Iterator[None]:
    """Whatever a test or fixture left running when something failed is stopped at the end."""
    yield
    stop_leftovers()


@pytest.fixture(scope="session")
def redis_standalone() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """Three masters, no replicas, the slots split evenly."""
    cluster = EmbeddedCluster(masters=3).start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> RedisServer:
    """The Redis a test runs on: standalone, or the cluster (see the module docstring)."""
    kind = getattr(request, "param", "standalone")
    server: RedisServer = request.getfixturevalue(f"redis_{kind}")
    return server


async def live_subscribers(redis: RedisClient, channel: str) -> int:
    """Subscribers of a live or control channel: sharded ones on the channel's node of a
    cluster."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        node = redis.get_node_from_key(channel)
        counts = await redis.pubsub_shardnumsub(channel, target_nodes=node)
    else:
        counts = await redis.pubsub_numsub(channel)
    ((_, subscribers),) = counts
    return int(subscribers)


def make_settings(redis_server: RedisServer, **overrides: object) -> Settings:
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
def relay(redis_server: RedisServer) -> Iterator[Tokenrelay]:
    server = Tokenrelay(make_settings(redis_server)).start()
    yield server
    server.stop()


@pytest.fixture
async def client(relay: Tokenrelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
        yield c


ADMIN_POSTGRES = os.environ.get("TOKENRELAY_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
"""A Postgres database on a server where the tests may create databases of their own."""


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new database on `ADMIN_POSTGRES`'s server, dropped afterwards (with the
    connections still open to it)."""
    import psycopg

    name = f"tokenrelay_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_POSTGRES, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{ADMIN_POSTGRES.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(ADMIN_POSTGRES, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's Postgres (127.0.0.1:5432), dropped afterwards."""
    import psycopg

    try:
        psycopg.connect(ADMIN_POSTGRES, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"these tests need a Postgres server at {ADMIN_POSTGRES} where they may create "
            f"databases (start one there, or set TOKENRELAY_TEST_POSTGRES to another's URL): {exc}"
        )
    with fresh_database() as url:
        yield url
