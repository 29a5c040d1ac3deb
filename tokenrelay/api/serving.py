"""How uvicorn serves the API: timeouts and the open-connection count the limits read.

uvicorn closes idle keep-alive connections but gives a client forever to send a request's
headers; `GuardedHttpTools` closes a connection whose headers do not arrive in time, and tells
the application how many connections the process holds (``RequestLimits`` answers 503 past the
cap, probes excepted) and its own `send` (event streams write their body chunks with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenrelay.api.limits import OPEN_CONNECTIONS
from tokenrelay.api.sse import SERVER_SEND
from tokenrelay.broker.settings import Settings, get_settings

MAX_HEADER_BYTES = 64 * 1024
"""A request line and headers longer than this are refused (431) rather than buffered."""

REFUSED_LINGER_SECONDS = 1.0
"""How long a refused connection is drained before it is closed."""

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
        if self.header_timeout is None:
            type(self).header_timeout = get_settings().header_timeout_seconds
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = False
        self._refused = False

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

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

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


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` that apply `settings`' limits, for a server run
    in-process (the CLI names `GuardedHttpTools`, which reads the environment's settings)."""
    protocol = type(
        "GuardedHttpTools", (GuardedHttpTools,), {"header_timeout": settings.header_timeout_seconds}
    )
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "ws_max_size": settings.max_body_bytes,
    }
