"""With API keys on, a stream cut short is still aborted (no terminating chunk), never closed
cleanly: the time budget, an API shutdown and Redis lost mid-stream."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_api_stream import read_into
from tests.integration.test_stream import new_thread, run_body
from tests.server import Tokenrelay, WorkerProcess
from tests.sse import SSE, events
from tokenrelay.broker.embedded import EmbeddedRedis

pytestmark = [pytest.mark.timeout(120)]

KEY = {"x-api-key": "k1"}


async def aborted(r: httpx.Response) -> bool:
    """Read the rest of `r` (events may have been read already); True when it was aborted."""
    try:
        await events(r)
    except httpx.RemoteProtocolError:
        return True
    return False


async def test_time_budget_aborts_with_keys_on(redis_server: RedisServer) -> None:
    server = Tokenrelay(make_settings(redis_server, api_keys=["k1"])).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=KEY) as c:
            tid = await new_thread(c)
            got: list[SSE] = []
            url = f"/threads/{tid}/runs/stream"
            async with c.stream("POST", url, params={"max_seconds": 1}, json=run_body("slow")) as r:
                assert await read_into(r, got)  # aborted, not a clean end
            assert got and got[-1].event != "values"
            # the run's own end closes cleanly
            headers = {**KEY, "Last-Event-ID": got[-1].id or ""}
            async with c.stream("GET", r.headers["location"], headers=headers) as r2:
                assert not await read_into(r2, got)
            assert got[-1].event == "values"
    finally:
        server.stop()


async def test_api_shutdown_aborts_with_keys_on(redis_server: RedisServer, tmp_path: Path) -> None:
    s = make_settings(redis_server, api_keys=["k1"])
    worker = Tokenrelay(s).start()  # runs the graphs; the API under test is its own process
    api = WorkerProcess(
        s, tmp_path / "api.log", command="api", TOKENRELAY_API_KEYS=json.dumps(["k1"])
    ).start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=KEY) as c:
            tid = await new_thread(c)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
                await events(r, limit=3)
                api.signal(signal.SIGTERM)
                assert await aborted(r)
        assert api.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        api.stop()
        worker.stop()


async def test_redis_lost_mid_stream_aborts_with_keys_on(own_redis: EmbeddedRedis) -> None:
    server = Tokenrelay(make_settings(own_redis, api_keys=["k1"])).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=KEY) as c:
            tid = await new_thread(c)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
                await events(r, limit=3)
                own_redis.kill()
                assert await aborted(r)
            own_redis.start()  # so the worker can drain and stop at once
    finally:
        server.stop()
