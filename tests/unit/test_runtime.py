"""Stopping a task whose cancellation may be lost (Python 3.11's `asyncio.wait_for`, inside
redis-py, can swallow one): it is cancelled again until it ends, and its unwinding is not cut
short."""

from __future__ import annotations

import asyncio

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
