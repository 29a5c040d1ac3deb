"""How uvicorn serves the API: options on the connections it accepts."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import httpx
import psutil
import pytest
import uvicorn

from tokenrelay.api.serving import uvicorn_options
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
