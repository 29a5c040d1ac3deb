"""Server-Sent Events: the only place that frames events and heartbeats, and the response that
carries them (heartbeats, client disconnects, time budgets and aborts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenrelay.broker import codec
from tokenrelay.broker.log import History
from tokenrelay.broker.models import END_EVENT, PROTOCOL_ONLY, Entry, Gap
from tokenrelay.broker.runtime import cancel_and_wait

HEARTBEAT = b": heartbeat\n\n"

SERVER_SEND = "tokenrelay.server_send"
"""Scope key the server protocol (api/serving.py) sets: the server's own `send`. An event
stream's body chunks go out with it, past the middleware: each would otherwise wrap every chunk
of a long stream, and none of them looks past a response's start (none may: a transformed body
is no event stream)."""

SERVER_WRITE = "tokenrelay.server_write"
"""Scope key the server protocol sets: a function that writes one body chunk of the response
at once, without awaiting, or returns False having written nothing when it cannot (the client
reads slower than the server writes, it is gone, or no chunked body is being sent). A stream's
body writes live events with it while it waits for them (`LiveWriter`)."""

WATCH_DISCONNECT = "tokenrelay.watch_disconnect"
"""Scope key the server protocol sets: a callable taking a future, which the protocol resolves
with `DISCONNECTED` when the connection is lost. An event stream watches its client with it
instead of a task per stream waiting on `receive`."""

SSE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


def format_event(entry: Entry) -> bytes:
    """``event: <name>\\ndata: <json>\\nid: <stream id>\\n\\n``, as the Agent Server frames it."""
    id_ = entry.id
    return b"event: %s\ndata: %s\nid: %d-%d\n\n" % (
        entry.name.encode(),
        entry.data,
        id_.ms,
        id_.seq,
    )


_END = END_EVENT.encode()
_PROTOCOL_ONLY = PROTOCOL_ONLY.encode()


def format_history(page: History, names: set[str] | None = None) -> tuple[bytes, int]:
    """`format_event` of each classic entry of `page` (only those whose mode is in `names`,
    when given) as one bytes, and how many: one pass over the rows Redis returned, building
    no entry, so a full replay costs a few list appends per event."""
    wanted = None if names is None else {n.encode() for n in names}
    out: list[bytes] = []
    # By blob ref: the name of the entries sent with it, and their frame before and after the
    # data (up to the id). Most of a replay takes only this path.
    frames: dict[bytes, tuple[bytes, bytes, bytes]] = {}
    sent = 0
    it = iter(page.rows)
    for id_, name, data, ref in zip(it, it, it, it, strict=True):
        if ref:
            frame = frames.get(ref)
            if frame is not None and frame[0] == name:
                out += (frame[1], data, frame[2], id_, b"\n\n")
                sent += 1
                continue
        if name[:1] == _PROTOCOL_ONLY or name == _END:
            continue
        if ref:
            parts = page.splice_parts(ref)
            if parts is None:  # no such blob: the entry as the log gives it (an error)
                out.append(format_event(page.entry(id_, name, data, ref)))
                sent += 1
                continue
            if wanted is not None and name.split(b"|", 1)[0] not in wanted:
                continue
            before, after = b"event: " + name + b"\ndata: " + parts[0], parts[1] + b"\nid: "
            frames[ref] = (name, before, after)
            out += (before, data, after, id_, b"\n\n")
        else:
            if wanted is not None and name.split(b"|", 1)[0] not in wanted:
                continue
            out += (b"event: ", name, b"\ndata: ", data, b"\nid: ", id_, b"\n\n")
        sent += 1
    return b"".join(out), sent


def format_protocol_event(method: str, payload: bytes, seq: int) -> bytes:
    """An agent streaming protocol event: the method as the SSE event, the seq as its id."""
    return b"event: %s\ndata: %s\nid: %d\n\n" % (method.encode(), payload, seq)


def format_data(data: bytes) -> bytes:
    """A bare ``data:`` event, as the AI SDK's UI message stream frames its parts."""
    return b"data: %s\n\n" % data


def format_error(data: bytes) -> bytes:
    """An `error` event that is not stored, so it has no id."""
    return b"event: error\ndata: %s\n\n" % data


def gap_payload(gap: Gap) -> bytes:
    """The `error` payload that reports trimmed history (StreamGap) on every protocol."""
    return codec.error_payload(
        "StreamGap",
        f"events after {gap.after} are no longer retained; "
        f"the stream goes on from {gap.resumes_at}",
    )


class StreamAborted(Exception):
    """Raised after the headers went out to end a response without its terminating chunk.

    SDK clients treat a clean close as the end of the run but reconnect (with Last-Event-ID)
    on a network error, so a stream cut short by a time budget or a shutdown is aborted.
    """


class _QuietAbort(logging.Filter):
    """Keep the server's error log free of deliberate aborts."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamAborted)


logging.getLogger("uvicorn.error").addFilter(_QuietAbort())


class Draining(asyncio.Event):
    """The shutdown signal: an Event a response can watch with a future of its own (no task
    waiting on it per open stream: an idle connection costs its memory, not CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: set[asyncio.Future[Any]] = set()

    def set(self) -> None:
        super().set()
        watchers, self._watchers = self._watchers, set()
        for future in watchers:
            if not future.done():
                future.set_result(None)

    def watch(self, future: asyncio.Future[Any]) -> None:
        """Resolve `future` when this is set (at once if it is); a done future is dropped."""
        if self.is_set():
            if not future.done():
                future.set_result(None)
            return
        self._watchers.add(future)
        future.add_done_callback(self._watchers.discard)


def _refuse(chunk: bytes) -> bool:
    return False


class LiveWriter:
    """Lets a stream's body write live events to its client from the fan-out's turn, while it
    waits for them, instead of being woken to hand each batch to its response: with hundreds of
    readers of one run, those wake-ups were, after the socket writes themselves, the largest
    part of what a live event cost the API. `write` refuses (False) until the response has sent
    its headers on a server that offers `SERVER_WRITE`, and again once the response is ending."""

    __slots__ = ("write",)

    def __init__(self) -> None:
        self.write: Callable[[bytes], bool] = _refuse


class EventStreamResponse(Response):
    """A ``text/event-stream`` response fed by `body`.

    It stops when the body ends (clean close), when the client disconnects (`on_disconnect`
    is awaited), or when `deadline` passes or `abort` is set (the response is aborted).
    """

    media_type = "text/event-stream; charset=utf-8"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        abort: Draining | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        live_writer: LiveWriter | None = None,
    ) -> None:
        # Set here rather than by `Response.__init__` (one per join, the hot path of a
        # reconnect storm). The body is streamed with chunked encoding: no Content-Length.
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in {**SSE_HEADERS, **headers}.items()
        ]
        self.raw_headers.append((b"content-type", self.media_type.encode("latin-1")))
        self._body = body
        self._deadline = deadline
        self._abort = abort
        self._on_disconnect = on_disconnect
        self._live_writer = live_writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        write: Send = scope.get(SERVER_SEND, send)
        loop = asyncio.get_running_loop()
        live_writer = self._live_writer
        if live_writer is not None:
            live_writer.write = scope.get(SERVER_WRITE, _refuse)

        async def stream() -> None:
            async for chunk in self._body:
                await write({"type": "http.response.body", "body": chunk, "more_body": True})

        # The body runs in a task of its own: resumed at each chunk, it is a few frames deep,
        # not under the request's whole middleware chain. What ends it is one future: the
        # body's end, the client leaving (told by the server protocol, with no task waiting on
        # `receive` for it), the time budget or the shutdown.
        ended: asyncio.Future[str | None] = loop.create_future()
        streamer = loop.create_task(stream())
        streamer.add_done_callback(lambda _: _resolve(ended, STREAMED))
        watch = scope.get(WATCH_DISCONNECT)
        watcher: asyncio.Task[None] | None = None
        if watch is not None:
            watch(ended)
        else:  # a server without the hook: a task waits for the disconnect message
            watcher = loop.create_task(_disconnected(receive, ended))
        timer: asyncio.TimerHandle | None = None
        if self._deadline is not None:
            timer = loop.call_at(self._deadline, _resolve, ended)
        if self._abort is not None:
            self._abort.watch(ended)

        outcome = "done"
        failure: BaseException | None = None
        try:
            reason = await ended
            if live_writer is not None:
                live_writer.write = _refuse  # from here the body is stopping or has stopped
            if reason == STREAMED:
                failure = None if streamer.cancelled() else streamer.exception()
                if failure is not None:
                    # A write to a client that is gone is its disconnect, not a failed stream.
                    outcome = "disconnected" if isinstance(failure, OSError) else "error"
            else:
                outcome = "disconnected" if reason == DISCONNECTED else "aborted"
                streamer.cancel()
                if outcome == "disconnected" and self._on_disconnect is not None:
                    # At once, not after the body has stopped: a cancellation swallowed inside
                    # the body (a Redis call can) holds it until it is cancelled again.
                    on_disconnect, self._on_disconnect = self._on_disconnect, None
                    await on_disconnect()
                await cancel_and_wait(streamer, cancelled=True)
        finally:
            if live_writer is not None:
                live_writer.write = _refuse  # nothing after the body, however it ended
            if not ended.done():
                ended.cancel()  # unwatched: the protocol and the shutdown signal drop it
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()
            streamer.cancel()
            with contextlib.suppress(Exception):
                await self._body.aclose()  # type: ignore[attr-defined]

        if outcome == "done":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif outcome == "disconnected":
            if self._on_disconnect is not None:
                await self._on_disconnect()
        elif outcome == "error":
            assert failure is not None
            # A failure mid-stream (e.g. Redis went away) aborts, so the client resumes.
            raise StreamAborted(f"stream failed: {failure!r}") from failure
        else:
            raise StreamAborted("stream time budget reached or server shutting down")


DISCONNECTED = "disconnected"
STREAMED = "streamed"


async def _disconnected(receive: Receive, ended: asyncio.Future[str | None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if not ended.done():
        ended.set_result(DISCONNECTED)


def _resolve(future: asyncio.Future[Any], value: str | None = None) -> None:
    if not future.done():
        future.set_result(value)
