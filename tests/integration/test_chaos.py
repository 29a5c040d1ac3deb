"""Many concurrent runs, clients dropping and resuming at random: no gap, no duplicate."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.integration.test_stream import join, new_thread, run_body
from tests.server import Tokenrelay
from tests.sse import SSE, iter_sse

pytestmark = pytest.mark.timeout(180)


async def flaky_reader(client: httpx.AsyncClient, rng: random.Random) -> tuple[str, str, list[SSE]]:
    """Start a run, then drop and resume (Last-Event-ID) at random points until it ends."""
    tid = await new_thread(client)
    got: list[SSE] = []
    url, method, body = f"/threads/{tid}/runs/stream", "POST", run_body("slow")
    headers: dict[str, str] = {}
    while True:
        budget = rng.randint(1, 25)
        ended = True
        async with client.stream(method, url, json=body, headers=headers) as r:
            if method == "POST":
                url, method, body = r.headers["location"], "GET", None
            async for item in iter_sse(r):
                if isinstance(item, SSE):
                    got.append(item)
                    budget -= 1
                    if budget == 0 and rng.random() < 0.8:
                        ended = False
                        break  # drop the connection mid-run
        if ended:
            break
        await asyncio.sleep(rng.random() * 0.2)
        headers = {"Last-Event-ID": got[-1].id or "-1"}
    return tid, url.split("/")[-2], got


async def test_fifty_runs_with_random_drops_reassemble_exactly(relay: Tokenrelay) -> None:
    rng = random.Random(20261123)
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=relay.url, timeout=60, limits=limits) as client:
        results = await asyncio.gather(
            *(flaky_reader(client, random.Random(rng.random())) for _ in range(50))
        )
        for tid, run_id, got in results:
            reference = await join(client, tid, run_id, "-1")
            assert [e.id for e in got] == [e.id for e in reference], run_id
            assert [e.data for e in got] == [e.data for e in reference]
            text = "".join(e.json()[0]["content"] for e in got if e.event == "messages")
            assert text.count(" ") + 1 == 60
