"""Replicas starting together against a fresh Postgres all come up (the checkpointer's tables
are set up under an advisory lock)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from tests.conftest import fresh_database
from tokenrelay.broker.graphs import open_checkpointer

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.mark.parametrize("replicas", [4, 8])
async def test_replicas_starting_together_on_a_fresh_database(
    fresh_postgres: str, replicas: int
) -> None:
    # Each replica opens its own pool and sets the tables up, all at the same moment.
    async with contextlib.AsyncExitStack() as stack:
        savers = await asyncio.gather(
            *(stack.enter_async_context(open_checkpointer(fresh_postgres)) for _ in range(replicas))
        )
        config = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
        assert all([await saver.aget_tuple(config) is None for saver in savers])  # type: ignore[arg-type]
