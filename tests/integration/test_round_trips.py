"""What starting a run costs the API in Redis round trips: each one is a turn of its event loop
and the client's CPU to pack and parse, on the path to a run's first token."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from redis.asyncio.connection import AbstractConnection

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import run_body
from tests.server import Tokenrelay
from tokenrelay.broker.connection import connect
from tokenrelay.broker.keys import Keys

pytestmark = pytest.mark.redis("standalone")  # one server: pipelines take effect in order


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Round trips (one send of one command or of a whole pipeline) by thread id."""
    counts: dict[int, int] = {}
    send = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        ident = threading.get_ident()
        counts[ident] = counts.get(ident, 0) + 1
        await send(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
    return counts


async def test_a_run_on_a_new_thread_is_recorded_and_queued_in_five_round_trips(
    redis_server: RedisServer, round_trips: dict[int, int]
) -> None:
    # No worker: the run stays queued, where it can be looked at.
    settings = make_settings(redis_server)
    server = Tokenrelay(settings, with_worker=False).start()
    redis = connect(redis_server.url)
    keys = Keys(settings.key_prefix)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            # A first run opens the connection and loads the scripts.
            assert (await c.post("/runs", json=run_body())).status_code == 200
            api = server.thread_ident
            before = round_trips.get(api, 0)
            r = await c.post("/runs", json=run_body())
            assert r.status_code == 200, r.text
            used = round_trips.get(api, 0) - before
            run = r.json()
            tid, rid = run["thread_id"], run["run_id"]
            # The thread (HSETNX; its fields with its index entries), the run (its hash, listed
            # on the thread), the thread's claim (one script) and, together, the busy mark and
            # the queue entry.
            assert used == 5
            listed = (await c.get(f"/threads/{tid}/runs")).json()
            assert [x["run_id"] for x in listed] == [rid]
            # Indexed, by its metadata too.
            found = await c.post("/threads/search", json={"metadata": {"graph_id": "fast"}})
            assert tid in [t["thread_id"] for t in found.json()]
            busy = await c.post("/threads/search", json={"status": "busy"})
            assert tid in [t["thread_id"] for t in busy.json()]
            assert (await c.get(f"/threads/{tid}")).json()["status"] == "busy"
            assert await redis.xlen(keys.queue()) == 2
    finally:
        await redis.aclose()
        server.stop()
