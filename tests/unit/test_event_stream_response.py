"""An event-stream response whose client has gone tells its owner at once, whatever the body
does with its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tokenrelay.api.sse import EventStreamResponse


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
