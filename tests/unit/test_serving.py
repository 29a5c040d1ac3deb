"""How uvicorn serves the API: options on the connections it accepts, and how it accepts them."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import httpx
import psutil
import pytest
import uvicorn

from tokenrelay.api.serving import Loop, uvicorn_options
from tokenrelay.broker.settings import Settings


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("passed_by_descriptor", [True, False])
async def test_accepted_connections_send_at_once(passed_by_descriptor: bool) -> None:
    """TCP_NODELAY is on for every accepted connection, also on a listening socket handed over
    by descriptor (`tokenrelay dev` gives its API process one), which uvicorn takes for a Unix
    socket. With Nagle's algorithm on, each request on a kept-alive connection waited for the
    client's delayed ACK (40 ms) before its body went out."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    where: dict[str, Any] = (
        {"fd": listener.fileno()} if passed_by_descriptor else {"host": "127.0.0.1", "port": port}
    )
    if not passed_by_descriptor:
        listener.close()
    config = uvicorn.Config(
        _ok, log_level="warning", lifespan="off", **where, **uvicorn_options(Settings())
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/")).text == "ok"  # the connection stays open
            accepted = [
                c
                for c in psutil.Process().net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
            ]
            assert len(accepted) == 1
            dup = socket.socket(fileno=os.dup(accepted[0].fd))
            try:
                assert dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                dup.close()
    finally:
        server.should_exit = True
        await serving
        if passed_by_descriptor:
            listener.close()


class _Counted(asyncio.Protocol):
    made: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


def test_a_burst_of_connections_is_taken_in_a_few_turns_of_the_loop() -> None:
    """A burst of clients waiting in the listen queue is accepted at once, not one connection
    per turn of the loop (libuv's own rule since 1.45): on a busy API process each turn takes
    milliseconds, and a reconnect storm of 1,000 clients waited seconds to be read. Once the
    server is closed, nothing more is accepted (the acceptor's copy of the socket is closed)."""
    burst = 200
    _Counted.made = []

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Counted, "127.0.0.1", 0, backlog=2 * burst)
        port = server.sockets[0].getsockname()[1]
        # The handshakes complete in the kernel: every client waits in the listen queue.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(burst)]
        turns = 0
        while len(_Counted.made) < burst and turns < 100:
            await asyncio.sleep(0)  # one turn of the loop
            turns += 1
        accepted = len(_Counted.made)
        for transport in _Counted.made:  # as uvloop's own listener sets it
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        server.close()
        for transport in _Counted.made:
            transport.close()
        for client in clients:
            client.close()
        await asyncio.sleep(0)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()
        return accepted, turns

    with asyncio.Runner(loop_factory=Loop) as runner:
        accepted, turns = runner.run(main())
    assert accepted == burst
    assert turns <= 10, f"{burst} waiting connections took {turns} turns of the loop"
