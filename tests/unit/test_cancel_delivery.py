"""A cancel asked for again never cuts short the unwinding of the one delivered before, and still
reaches a graph that swallowed it."""

from __future__ import annotations

import asyncio
import contextlib

from tests.unit.stubborn import Stubborn
from tokenrelay.producer.worker import _Running


def running(task: asyncio.Task[None]) -> _Running:
    return _Running(job=None, msg_id=b"0-1", task=task)  # type: ignore[arg-type]


async def test_a_repeated_cancel_does_not_cancel_the_unwinding_of_the_first() -> None:
    written: list[str] = []

    async def graph() -> None:
        # As LangGraph's loop does on its way out: its last checkpoint is written by a task the
        # cancelled one awaits; a second cancel there would cancel that write.
        try:
            await asyncio.sleep(3600)
        finally:

            async def write_checkpoint() -> None:
                await asyncio.sleep(0.05)
                written.append("checkpoint")

            await asyncio.create_task(write_checkpoint())

    run = running(asyncio.create_task(graph()))
    await asyncio.sleep(0)
    run.deliver_cancel()
    for _ in range(5):  # every flush and every repeated stop asks again meanwhile
        await asyncio.sleep(0.005)
        run.deliver_cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run.task
    assert written == ["checkpoint"]


async def test_a_swallowed_cancel_is_delivered_again_once_the_graph_goes_on() -> None:
    def goes_on() -> None:
        run.events += 1  # a library call inside the graph took it, and the graph made an event

    stubborn = Stubborn(1, goes_on)
    run = running(asyncio.create_task(stubborn.wait()))
    await asyncio.sleep(0)
    run.deliver_cancel()
    await asyncio.sleep(0.01)
    assert not run.task.done() and stubborn.swallowed == 1
    run.deliver_cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(run.task, 5)
    assert run.task.cancelled()
