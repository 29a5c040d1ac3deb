"""Limits per API process (tokenrelay/api/limits.py, tokenrelay/api/serving.py): each answers
clearly past it, and the probes are answered whatever the load."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import websockets

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import new_thread, run_body
from tests.server import Tokenrelay


@pytest.fixture(scope="module")
def limited(redis_server: RedisServer) -> Iterator[Tokenrelay]:
    settings = make_settings(
        redis_server,
        max_body_bytes=4096,
        max_json_depth=5,
        max_open_streams=1,
        max_open_connections=4,
    )
    server = Tokenrelay(settings).start()
    yield server
    server.stop()


@pytest.fixture
async def client(limited: Tokenrelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as c:
        yield c


async def test_a_body_over_the_limit_is_413_and_not_echoed(client: httpx.AsyncClient) -> None:
    big = {"metadata": {"blob": "x" * 5000}}
    r = await client.post("/threads", json=big)
    assert r.status_code == 413
    assert r.json() == {"detail": "Request body exceeds 4096 bytes (TOKENRELAY_MAX_BODY_BYTES)"}
    # The rest of a refused body is read and dropped: the connection serves the next request.
    r = await client.post("/threads", json={"metadata": {"blob": "x" * 500_000}})
    assert r.status_code == 413
    assert (await client.post("/threads", json={})).status_code == 200

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"metadata": {"blob": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}'

    r = await client.post(
        "/threads", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and len(r.content) < 200
    tid = await new_thread(client)
    r = await client.post(f"/threads/{tid}/runs", json={**run_body(), "input": "y" * 5000})
    assert r.status_code == 413
    assert (await client.get(f"/threads/{tid}/runs")).json() == []
    assert (
        await client.post("/threads", json={"metadata": {"blob": "x" * 3000}})
    ).status_code == 200


async def test_json_nested_past_the_depth_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/threads", json={"metadata": {"a": {"b": {"c": {"d": {}}}}}})
    assert r.status_code == 422
    assert r.json() == {"detail": "Request body nests JSON deeper than 5 levels"}
    r = await client.post("/threads", json={"metadata": {"a": {"b": {"c": {}}}}})
    assert r.status_code == 200


async def test_open_streams_are_capped_and_probes_still_answer(
    client: httpx.AsyncClient,
) -> None:
    tid = await new_thread(client)
    body = {"channels": ["lifecycle"]}
    # A protocol subscription stays open (heartbeats) until the client leaves.
    async with client.stream("POST", f"/threads/{tid}/stream/events", json=body) as held:
        assert held.status_code == 200
        r = await client.post(f"/threads/{tid}/runs/stream", json=run_body())
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "TOKENRELAY_MAX_OPEN_STREAMS" in r.json()["detail"]
        assert (await client.get(f"/threads/{tid}/runs")).json() == []  # no run was started
        for probe in ("/healthz", "/readyz", "/ok"):
            assert (await client.get(probe)).status_code == 200
        assert (await client.get(f"/threads/{tid}")).status_code == 200  # not a stream
        ws_url = str(client.base_url).replace("http://", "ws://") + f"/threads/{tid}/stream/events"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
    for _ in range(200):  # until the server has seen the first stream end
        r = await client.post(f"/threads/{tid}/runs/stream", json=run_body())
        if r.status_code == 200:
            break
        await asyncio.sleep(0.05)
    assert r.status_code == 200 and "event: values" in r.text


async def test_open_connections_are_capped_and_probes_still_answer(limited: Tokenrelay) -> None:
    idle = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(4)]
    try:
        async with httpx.AsyncClient(base_url=limited.url, timeout=30) as c:
            r = await c.post("/threads", json={})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "TOKENRELAY_MAX_OPEN_CONNECTIONS" in r.json()["detail"]
            assert (await c.get("/healthz")).status_code == 200
    finally:
        for sock in idle:
            sock.close()
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as c:
        for _ in range(200):  # until the server has seen the idle connections close
            r = await c.post("/threads", json={})
            if r.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200


def test_a_client_that_never_finishes_its_headers_is_disconnected(
    redis_server: RedisServer,
) -> None:
    settings = make_settings(redis_server, header_timeout_seconds=0.5)
    server = Tokenrelay(settings, with_worker=False).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            assert sock.recv(1024) == b""  # closed by the server, no response
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while not response.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(1024)
                assert chunk, response
                response += chunk
            assert response.startswith(b"HTTP/1.1 200")
            # Idle after a response: a second request's headers are timed the same way.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            assert sock.recv(1024) == b""
    finally:
        server.stop()


async def test_rate_limit_per_client_is_429_with_retry_after(redis_server: RedisServer) -> None:
    # One request a minute after a burst of two: the third in a row is refused whatever the
    # machine's speed.
    settings = make_settings(
        redis_server, rate_limit_per_minute=1, rate_limit_burst=2, api_keys=["alice", "bob"]
    )
    server = Tokenrelay(settings, with_worker=False).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            alice = {"x-api-key": "alice"}
            assert (await c.get("/info", headers=alice)).status_code == 200
            assert (await c.get("/info", headers=alice)).status_code == 200
            r = await c.get("/info", headers=alice)
            assert r.status_code == 429
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert "TOKENRELAY_RATE_LIMIT_PER_MINUTE" in r.json()["detail"]
            assert (await c.get("/info", headers={"x-api-key": "bob"})).status_code == 200
            # Without a key, or with an invented one, the client address is the key.
            assert (await c.get("/info")).status_code == 200
            assert (await c.get("/info", headers={"x-api-key": "eve1"})).status_code == 200
            assert (await c.get("/info", headers={"x-api-key": "eve2"})).status_code == 429
            for _ in range(5):
                assert (await c.get("/healthz", headers=alice)).status_code == 200
    finally:
        server.stop()


def test_headers_past_64_kib_are_refused(limited: Tokenrelay) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):
            try:
                sock.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
            except OSError:  # refused and closed before all of it was sent
                break
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 431 ")
    assert response.endswith(b'{"detail":"Request headers exceed 65536 bytes"}')
