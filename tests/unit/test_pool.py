"""The Redis connection pool's bound holds however its checkouts fail."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError

from tokenrelay.broker.connection import BoundedPool
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
