"""How uvicorn serves the API: timeouts, the open-connection count the limits read, and how
connections are accepted.

uvicorn closes idle keep-alive connections but gives a client forever to send a request's
headers; `GuardedHttpTools` closes a connection whose headers do not arrive in time, and tells
the application how many connections the process holds (``RequestLimits`` answers 503 past the
cap, probes excepted), its own `send` (event streams write their body chunks with it) and
`write_now`, which writes a chunk without awaiting or declines (the fan-out writes live events
to readers waiting for them with it).

`Loop` is uvloop, except that a server takes every connection waiting in its listen queue at
each turn of the loop: libuv (since 1.45) accepts one per turn, so on a busy process a burst of
reconnecting clients waited seconds in the kernel's queue before the first of their requests
was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tokenrelay.api.limits import OPEN_CONNECTIONS
from tokenrelay.api.sse import DISCONNECTED, SERVER_SEND, SERVER_WRITE, WATCH_DISCONNECT
from tokenrelay.broker.settings import Settings, get_settings

MAX_HEADER_BYTES = 64 * 1024
"""A request line and headers longer than this are refused (431) rather than buffered."""

REFUSED_LINGER_SECONDS = 1.0
"""How long a refused connection is drained before it is closed."""

ACCEPT_BATCH = 256
"""Connections one turn of the loop accepts from a listening socket at most: a burst is taken
at once, yet a process sharing its socket with others does not take them all."""

ACCEPT_PAUSE_SECONDS = 0.5
"""How long accepting waits after the process ran out of descriptors or memory."""

log = logging.getLogger("tokenrelay.serving")

_TOO_LARGE_BODY = b'{"detail":"Request headers exceed %d bytes"}' % MAX_HEADER_BYTES
HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_TOO_LARGE_BODY)
) + _TOO_LARGE_BODY


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-read timeout
    (TOKENRELAY_HEADER_TIMEOUT_SECONDS, read from the environment in each worker process)."""

    header_timeout: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = _releasing(self.app)
        if self.header_timeout is None:
            type(self).header_timeout = get_settings().header_timeout_seconds
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = False
        self._refused = False
        self._lost_watchers: list[asyncio.Future[Any]] = []

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            # A listening socket handed over by descriptor (`--fd`, as `tokenrelay dev` does)
            # is taken by uvicorn as a Unix socket, so the loop leaves Nagle's algorithm on for
            # its TCP connections: a response's second write, or an event after the one before,
            # then waits for the client's delayed ACK (40 ms on Linux). A true Unix socket
            # refuses the option.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until closed, so the client reads the 431 (no reset)
        super().data_received(data)
        if not self._in_headers:
            return
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._disarm_header_timer()
            self._refused = True
            self.transport.write(HEADERS_TOO_LARGE)
            self.loop.call_later(REFUSED_LINGER_SECONDS, self.transport.close)

    def on_message_begin(self) -> None:
        # A request starts (not the rest of a body the app did not read): its headers are timed.
        super().on_message_begin()
        self.scope[OPEN_CONNECTIONS] = len(self.connections)  # type: ignore[literal-required]
        self._in_headers = True
        self._header_bytes = 0
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm_header_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            self.scope[SERVER_SEND] = cycle.send  # type: ignore[literal-required]
            self.scope[SERVER_WRITE] = functools.partial(write_now, cycle)  # type: ignore[literal-required]
            self.scope[WATCH_DISCONNECT] = self._watch_lost  # type: ignore[literal-required]

    def _watch_lost(self, future: asyncio.Future[Any]) -> None:
        """Resolve `future` with `DISCONNECTED` when this connection is lost."""
        if self.transport.is_closing():
            future.set_result(DISCONNECTED)
            return
        # A response that ended cancelled its future; pipelined requests may leave several.
        self._lost_watchers = [f for f in self._lost_watchers if not f.done()]
        self._lost_watchers.append(future)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)
        watchers, self._lost_watchers = self._lost_watchers, []
        for future in watchers:
            if not future.done():
                future.set_result(DISCONNECTED)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            assert self.header_timeout is not None
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


SERVER_KEYS = (SERVER_SEND, SERVER_WRITE, WATCH_DISCONNECT)

App = Callable[[Any, Any, Any], Awaitable[None]]


@functools.lru_cache(maxsize=8)
def _releasing(app: App) -> App:
    """`app`, taking the server's own callables (`SERVER_KEYS`) out of each request's scope once
    the application is done with it.

    Each of them holds the request's cycle or its connection, and both hold the scope: left in
    it, every request's scope, cycle, connection and transport (about fifty objects) would be
    freed only by the collector, not as the connection closes (28,000 objects in cycles 10 s into
    the benchmark's resumes under load); taken out, they are freed as soon as the request ends."""

    async def run(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            for key in SERVER_KEYS:
                scope.pop(key, None)

    return run


def write_now(cycle: RequestResponseCycle, chunk: bytes) -> bool:
    """Write `chunk` as the next chunk of `cycle`'s chunked response body, as its `send` would,
    without awaiting (`SERVER_WRITE`); False, having written nothing, where `send` would wait
    for the client to read (flow control) or write nothing (the client is gone, the response
    complete or not a chunked body)."""
    if (
        cycle.flow.write_paused
        or cycle.disconnected
        or cycle.response_complete
        or not cycle.chunked_encoding
    ):
        return False
    cycle.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    return True


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` that apply `settings`' limits, for a server run
    in-process (the CLI names `GuardedHttpTools`, which reads the environment's settings)."""
    protocol = type(
        "GuardedHttpTools", (GuardedHttpTools,), {"header_timeout": settings.header_timeout_seconds}
    )
    return {
        "http": protocol,
        "loop": "tokenrelay.api.serving:Loop",
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "ws_max_size": settings.max_body_bytes,
    }


class _Acceptor:
    """Accepts the connections waiting on a listening socket, up to `ACCEPT_BATCH` each time it
    is readable, and hands each to the loop as uvloop's own listener would.

    It reads a duplicate of the listener's descriptor, so the two never share a registration;
    whichever of the two runs first in a turn takes the connections (the other finds none)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: Any,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._sock = socket.socket(fileno=os.dup(listener.fileno()))
        self._sock.setblocking(False)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._paused: asyncio.TimerHandle | None = None
        loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: let connections end before trying again.
                    log.warning("cannot accept connections: %s", exc)
                    self._loop.remove_reader(self._sock.fileno())
                    self._paused = self._loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume)
                    return
                continue  # the client gave up before it was accepted
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)  # type: ignore[arg-type]
        except Exception as exc:  # a connection that could not be set up is closed, nothing more
            log.debug("dropped an accepted connection: %r", exc)
            conn.close()

    def _resume(self) -> None:
        self._paused = None
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class _Server:
    """The loop's server, and the acceptors reading its sockets, closed with it."""

    def __init__(self, server: asyncio.AbstractServer, acceptors: list[_Acceptor]) -> None:
        self._server = server
        self._acceptors = acceptors

    def close(self) -> None:
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        self._server.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class Loop(uvloop.Loop):  # type: ignore[misc]
    """uvloop, its TCP servers accepting every waiting connection at each turn (`_Acceptor`)."""

    async def create_server(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> Any:
        server: Any = await super().create_server(protocol_factory, *args, **kwargs)
        acceptors = [_Acceptor(self, sock, protocol_factory) for sock in server.sockets or ()]
        return _Server(server, acceptors)
