"""The Redis client both processes use, against a real redis-server: a paused Redis fails a
command within the socket timeout instead of hanging it, and a command that finds no free
connection fails as Redis being unavailable (what the API answers 503 to), not with a bare
TimeoutError."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from redis.exceptions import ConnectionError, TimeoutError

from tests.conftest import RedisServer
from tokenrelay.broker import connection
from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis

pytestmark = pytest.mark.redis("standalone", "cluster")


async def test_a_write_redis_does_not_take_fails_within_the_socket_timeout(
    own_redis: EmbeddedRedis,
) -> None:
    # A paused Redis takes what fits in the kernel's buffers and then nothing: the write of a
    # command larger than those waits, and must fail at the socket timeout, not hang.
    client = connect(f"{own_redis.url}?socket_timeout=0.5")
    try:
        await client.ping()
        assert own_redis.pid is not None
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises((TimeoutError, ConnectionError)):
                # Bounded here only so that a hang fails the test instead of stalling it.
                async with asyncio.timeout(30):
                    await client.set("tr:test:big", b"x" * (64 << 20))
            assert asyncio.get_running_loop().time() - started < 25
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        # The connection the write left half sent was closed: the next command is answered.
        assert await client.ping()
        assert await client.exists("tr:test:big") == 0
    finally:
        await client.aclose()


async def test_a_command_that_finds_no_free_connection_fails_as_unavailable(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "POOL_TIMEOUT", 0.3)
    client = connect(redis_server.url, max_connections=1)
    try:
        await client.ping()
        # One command holds the only connection; the next waits for it, then gives up.
        held = asyncio.ensure_future(client.blpop(["tr:test:{pool}:nothing"], timeout=2))
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectionError, match="No connection available"):
            await client.get("tr:test:{pool}:other")
        assert await held is None
    finally:
        await client.aclose()
