"""The Redis connection pool: its bound holds however its checkouts fail, and its connections
pack commands as redis-py does."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import ConnectionPool
from redis.exceptions import ConnectionError, DataError

from tokenrelay.broker.connection import BoundedPool, _HiredisPacking
from tokenrelay.broker.embedded import free_port


async def test_failed_checkouts_give_back_their_permit_once() -> None:
    # Nothing listens there: every checkout fails while connecting, after redis-py has already
    # given the connection back through the pool's `release`.
    pool = BoundedPool.from_url(f"redis://127.0.0.1:{free_port()}/0", max_connections=2)
    for _ in range(5):
        with pytest.raises(ConnectionError):
            await pool.get_connection()
    # Two checkouts in flight at most, not more: the failures did not add permits.
    assert pool._permits._value == 2
    await pool.disconnect()


async def test_a_checkout_cut_short_leaves_the_bound_whole() -> None:
    pool = BoundedPool.from_url(f"redis://127.0.0.1:{free_port()}/0", max_connections=1)
    attempt = asyncio.ensure_future(pool.get_connection())
    await asyncio.sleep(0)
    attempt.cancel()
    with pytest.raises((asyncio.CancelledError, ConnectionError)):
        await attempt
    assert pool._permits._value == 1
    await pool.disconnect()


ARGUMENTS = [
    ("EVALSHA", "ab" * 20, 2, b"tr:run:1:events", "tr:run:1:meta", 100_000, 3600, 1.5, 0.1, -7),
    ("SET", "café", memoryview(b"binary\r\n\x00")),
    ("XADD", b"k", "*", "e", b"\xff\xfe", "d", 10**30),
]


@pytest.mark.parametrize("args", ARGUMENTS)
def test_commands_are_packed_as_redis_py_packs_them(args: tuple[object, ...]) -> None:
    ours = BoundedPool.from_url("redis://127.0.0.1:1/0").make_connection()
    theirs = ConnectionPool.from_url("redis://127.0.0.1:1/0").make_connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    commands = [args, ("PING",), args]
    assert b"".join(ours.pack_commands(commands)) == b"".join(theirs.pack_commands(commands))


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (("SET", "k", True), True),  # redis-py refuses a bool (hiredis would not tell)
        (("SET", "k", None), True),
        (("SET", "k", bytearray(b"v")), False),
        (("CONFIG GET", "maxmemory"), False),  # split into two arguments by redis-py
    ],
)
def test_what_hiredis_does_not_take_goes_redis_pys_way(
    args: tuple[object, ...], refused: bool
) -> None:
    ours = BoundedPool.from_url("redis://127.0.0.1:1/0").make_connection()
    theirs = ConnectionPool.from_url("redis://127.0.0.1:1/0").make_connection()
    if refused:
        with pytest.raises(DataError):
            ours.pack_command(*args)
        return
    assert ours.pack_command(*args) == theirs.pack_command(*args)


def test_a_pool_with_another_encoding_packs_redis_pys_way() -> None:
    ours = BoundedPool.from_url("redis://127.0.0.1:1/0?encoding=latin-1").make_connection()
    assert b"".join(ours.pack_command("SET", "é")).endswith(b"$1\r\n\xe9\r\n")
    assert not isinstance(ours, _HiredisPacking)
    assert isinstance(BoundedPool.from_url("redis://127.0.0.1:1/0").make_connection(),
                      _HiredisPacking)  # fmt: skip
