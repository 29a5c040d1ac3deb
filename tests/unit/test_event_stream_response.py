"""An event-stream response whose client has gone tells its owner at once, whatever the body
does with its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.unit.stubborn import Stubborn
from tokenrelay.api.sse import (
    DISCONNECTED,
    WATCH_DISCONNECT,
    Draining,
    EventStreamResponse,
    StreamAborted,
)


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


async def test_a_body_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    """A body that would never end by itself (a protocol subscription spans runs) and lost the
    cancellation its client's leaving sent it (Python 3.11's `asyncio.wait_for`, inside
    redis-py, can) is cancelled again: the response ends, and so does the body."""
    stubborn = Stubborn(1)
    stopped = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal stopped
        yield b": hello\n\n"
        try:
            await stubborn.wait()
        finally:
            stopped = True

    conn = _Connection()
    response = EventStreamResponse(body(), {})
    task = asyncio.ensure_future(response(conn.scope(), _never_receives, conn.send))
    await asyncio.sleep(0.05)
    conn.lose()
    async with asyncio.timeout(5):
        await task
    assert stubborn.swallowed == 1 and stopped


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


class _Connection:
    """The server protocol's side of `WATCH_DISCONNECT`."""

    def __init__(self) -> None:
        self.watchers: list[asyncio.Future[Any]] = []
        self.sent: list[dict[str, Any]] = []

    def scope(self) -> dict[str, Any]:
        return {"type": "http", WATCH_DISCONNECT: self.watchers.append}

    async def send(self, message: Any) -> None:
        self.sent.append(message)

    def lose(self) -> None:
        for future in self.watchers:
            if not future.done():
                future.set_result(DISCONNECTED)


async def _never_receives() -> Any:
    raise AssertionError("a server with the hook is never asked for a disconnect message")


async def test_with_the_server_hook_no_task_waits_for_the_client_and_its_loss_ends_the_stream() -> (
    None
):
    """The request's task and its body's, and no third waiting on `receive` for the client;
    the connection's loss stops the body, the owner is told, and the request's task goes on
    uncancelled (the server's code after it runs normally)."""
    connection = _Connection()
    told: list[str] = []
    closed: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b": hello\n\n"
            await asyncio.sleep(3600)
            yield b"never"
        finally:
            closed.append(True)

    async def on_disconnect() -> None:
        told.append("left")

    response = EventStreamResponse(body(), {}, on_disconnect=on_disconnect)

    async def request() -> int:
        await response(connection.scope(), _never_receives, connection.send)
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0)  # no cancel left pending on the task
        return task.cancelling()

    before = len(asyncio.all_tasks())
    task = asyncio.ensure_future(request())
    await asyncio.sleep(0.02)
    assert len(asyncio.all_tasks()) == before + 2, "the request's task and its body's, no more"
    assert len(connection.watchers) == 1
    connection.lose()
    assert await asyncio.wait_for(task, 5) == 0
    assert told == ["left"] and closed == [True]
    # No terminating chunk for a client that is gone.
    assert [m.get("body") for m in connection.sent[1:]] == [b": hello\n\n"]


async def test_a_cancel_from_elsewhere_still_cancels_the_stream() -> None:
    connection = _Connection()
    response = EventStreamResponse(_idle_body(), {})
    task = asyncio.ensure_future(response(connection.scope(), _never_receives, connection.send))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The stream's future is dropped: losing the connection later touches nothing.
    assert all(f.done() for f in connection.watchers)
    connection.lose()


async def test_a_stream_that_ended_is_not_cancelled_by_a_later_loss() -> None:
    """The connection outlives a finished stream (keep-alive): its loss must not cancel
    whatever the task does next."""
    connection = _Connection()

    async def short() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    async def request() -> str:
        await EventStreamResponse(short(), {})(connection.scope(), _never_receives, connection.send)
        connection.lose()
        await asyncio.sleep(0.01)
        return "next"

    assert await asyncio.wait_for(request(), 5) == "next"
    assert connection.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
