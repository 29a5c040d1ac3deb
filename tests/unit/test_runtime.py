"""Stopping a task whose cancellation may be lost (Python 3.11's `asyncio.wait_for`, inside
redis-py, can swallow one): it is cancelled again until it ends, and its unwinding is not cut
short."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.unit.stubborn import Stubborn
from tokenrelay.broker.runtime import cancel_and_wait


async def test_a_task_that_swallows_cancellations_is_cancelled_until_it_ends() -> None:
    stubborn = Stubborn(2)
    task = asyncio.ensure_future(stubborn.wait())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait(task, every=0.01)
    assert task.cancelled() and stubborn.swallowed == 2


async def test_an_unwinding_task_is_given_its_time_and_its_failure_is_taken() -> None:
    cleaned = False

    async def unwinds() -> None:
        nonlocal cleaned
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # cleanup that awaits: not cut short by a second cancel
            cleaned = True
            raise RuntimeError("failed while stopping")

    task = asyncio.ensure_future(unwinds())
    await asyncio.sleep(0)
    task.cancel()
    await cancel_and_wait(task, every=0.2, cancelled=True)
    assert cleaned and isinstance(task.exception(), RuntimeError)


_FIRST_TOKEN = """
import sys
from langchain_core.messages import AIMessageChunk
from tokenrelay.broker import codec
from tokenrelay.broker.runtime import settle_heap

settle_heap()
loaded = set(sys.modules)
codec.json_bytes(AIMessageChunk(content="hi", id="m1"))
print(sorted(set(sys.modules) - loaded))
"""


def test_the_first_token_loads_nothing_once_the_heap_is_settled() -> None:
    # orjson imports numpy (about 40 ms) the first time it meets an object it cannot encode by
    # itself; a process that had not done so at start stalled every run at its first token.
    pytest.importorskip("numpy")
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_TOKEN], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
