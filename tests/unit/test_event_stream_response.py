"""An event-stream response whose client has gone tells its owner at once, whatever the body
does with its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenrelay.api.sse import Draining, EventStreamResponse, StreamAborted


async def test_a_disconnect_is_handled_before_a_stubborn_body_stops() -> None:
    release = asyncio.Event()
    body_ended = False
    seen: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        nonlocal body_ended
        yield b": hello\n\n"
        # The cancellation is swallowed, as a library call inside the body may do: the body
        # goes on until something else ends it (here the test, or at worst a bound).
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await release.wait()
        body_ended = True

    async def on_disconnect() -> None:
        seen.append(body_ended)
        release.set()

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    response = EventStreamResponse(body(), {}, on_disconnect=on_disconnect)
    await response({"type": "http"}, receive, send)
    assert seen == [False]  # called once, while the body was still going
    assert body_ended
    assert sent[0]["type"] == "http.response.start"


async def _idle_body() -> AsyncIterator[bytes]:
    yield b": hello\n\n"
    await asyncio.sleep(3600)
    yield b""


async def _stays(message: Any = None) -> Any:
    await asyncio.sleep(3600)


async def _aborted(response: EventStreamResponse) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    with pytest.raises(StreamAborted):
        async with asyncio.timeout(5):
            await response({"type": "http"}, _stays, send)
    return sent


async def test_the_time_budget_and_the_shutdown_abort_a_stream_without_a_task_each() -> None:
    """Both end a future the response waits on: no task per open stream, and nothing left
    registered with the shutdown signal once the stream is over."""
    loop = asyncio.get_running_loop()
    draining = Draining()
    budget = EventStreamResponse(_idle_body(), {}, deadline=loop.time() + 0.05, abort=draining)
    sent = await _aborted(budget)
    assert sent[1]["body"] == b": hello\n\n" and not draining.is_set()
    assert not draining._watchers, "a stream that ended leaves no watcher behind"

    shutdown = EventStreamResponse(_idle_body(), {}, abort=draining)
    task = asyncio.ensure_future(_aborted(shutdown))
    await asyncio.sleep(0.05)
    assert len(draining._watchers) == 1
    draining.set()
    await task
    # A stream opened during the shutdown is aborted at once.
    await _aborted(EventStreamResponse(_idle_body(), {}, abort=draining))
