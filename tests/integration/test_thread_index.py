"""Thread search and count answered from the index (tokenrelay/broker/thread_index.py): the same
answers as reading every thread, at the cost of the page."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import run_body, stream_run
from tests.server import Tokenrelay

pytestmark = pytest.mark.redis("standalone", "cluster")


async def make(client: httpx.AsyncClient, **metadata: Any) -> str:
    r = await client.post("/threads", json={"metadata": metadata})
    assert r.status_code == 200
    return str(r.json()["thread_id"])


async def search(client: httpx.AsyncClient, **body: Any) -> list[str]:
    r = await client.post("/threads/search", json=body)
    assert r.status_code == 200, r.text
    return [t["thread_id"] for t in r.json()]


async def count(client: httpx.AsyncClient, **body: Any) -> int:
    r = await client.post("/threads/count", json=body)
    assert r.status_code == 200, r.text
    return int(r.json())


async def test_metadata_filters_sorts_and_pages(client: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex
    a = await make(client, tag=tag, color="red", n={"x": 1, "y": [1, 2]})
    b = await make(client, tag=tag, color="blue")
    c = await make(client, tag=tag, color="red")
    assert await search(client, metadata={"tag": tag}) == [c, b, a]  # updated_at, newest first
    assert await search(client, metadata={"tag": tag}, sort_order="asc") == [a, b, c]
    assert await search(client, metadata={"tag": tag, "color": "red"}) == [c, a]
    assert await search(client, metadata={"tag": tag, "n": {"y": [1, 2], "x": 1}}) == [a]
    assert await search(client, metadata={"tag": tag, "color": "green"}) == []
    by_id = sorted([a, b, c])
    assert (
        await search(client, metadata={"tag": tag}, sort_by="thread_id", sort_order="asc") == by_id
    )
    assert await search(client, metadata={"tag": tag}, sort_by="created_at", limit=1, offset=1) == [
        b
    ]
    r = await client.post("/threads/search", json={"metadata": {"tag": tag}, "limit": 2})
    assert r.headers["x-pagination-total"] == "3" and r.headers["x-pagination-next"] == "2"
    assert await count(client, metadata={"tag": tag}) == 3
    assert await count(client, metadata={"tag": tag, "color": "red"}) == 2

    # An update moves the thread in the index (and to the front by updated_at).
    r = await client.patch(f"/threads/{a}", json={"metadata": {"color": "blue"}})
    assert r.status_code == 200
    assert await search(client, metadata={"tag": tag, "color": "blue"}) == [a, b]
    assert await search(client, metadata={"tag": tag, "color": "red"}) == [c]
    assert (await client.delete(f"/threads/{b}")).status_code == 204
    assert await search(client, metadata={"tag": tag}) == [a, c]
    assert await count(client, metadata={"tag": tag}) == 2


async def test_status_filters_follow_runs(client: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex
    done, failed, asking, running = [await make(client, tag=tag) for _ in range(4)]
    await stream_run(client, done, run_body())
    await stream_run(client, failed, run_body("failing"))
    await stream_run(client, asking, run_body("interrupt"))
    r = await client.post(f"/threads/{running}/runs", json=run_body("slow"))
    assert r.status_code == 200
    run_id = r.json()["run_id"]
    f = {"tag": tag}
    assert await search(client, metadata=f, status="busy") == [running]
    assert await search(client, metadata=f, status="error") == [failed]
    assert await search(client, metadata=f, status="interrupted") == [asking]
    assert set(await search(client, metadata=f, status="idle")) == {done}
    assert await count(client, metadata=f, status="idle") == 1
    assert await count(client, metadata=f, status="busy") == 1
    r = await client.get(f"/threads/{running}/runs/{run_id}/join")
    assert r.status_code == 200
    assert await search(client, metadata=f, status="busy") == []
    assert set(await search(client, metadata=f, status="idle")) == {done, running}
    assert await count(client, metadata=f) == 4
    assert await count(client, metadata=f, status="idle") == 2


@pytest.mark.redis("standalone")  # commands counted on the one Redis
async def test_a_page_reads_the_page_not_every_thread(redis_server: RedisServer) -> None:
    server = Tokenrelay(make_settings(redis_server), with_worker=False).start()
    redis = Redis.from_url(redis_server.url)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tag = uuid.uuid4().hex
            await asyncio.gather(*(make(c, tag=tag) for _ in range(150)))

            async def thread_reads() -> int:
                stats = await redis.info("commandstats")
                return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

            before = await thread_reads()
            assert len(await search(c, metadata={"tag": tag}, limit=2)) == 2
            assert await count(c, metadata={"tag": tag}) == 150
            assert len(await search(c, limit=1)) == 1
            assert await thread_reads() - before <= 3  # the page's threads, not 150
    finally:
        await redis.aclose()
        server.stop()


async def test_long_values_and_big_integers_are_searchable(client: httpx.AsyncClient) -> None:
    # Pairs too long for the index are checked on the threads instead; integers past 64 bits
    # (which orjson cannot encode) have digests too.
    tag = uuid.uuid4().hex
    long = await make(client, tag=tag, note="x" * 1000)
    big = await make(client, tag=tag, n=2**70)
    assert await search(client, metadata={"tag": tag, "note": "x" * 1000}) == [long]
    assert await search(client, metadata={"note": "x" * 1000, "tag": tag}, limit=1) == [long]
    assert await count(client, metadata={"tag": tag, "note": "x" * 1000}) == 1
    assert await search(client, metadata={"tag": tag, "n": 2**70}) == [big]


async def test_a_threads_metadata_has_at_most_128_keys(client: httpx.AsyncClient) -> None:
    many = {f"k{i}": i for i in range(129)}
    r = await client.post("/threads", json={"metadata": many})
    assert r.status_code == 422
    assert r.json() == {"detail": "A thread's metadata has at most 128 keys"}
    tid = await make(client, **{f"k{i}": i for i in range(128)})
    r = await client.patch(f"/threads/{tid}", json={"metadata": {"one_more": 1}})
    assert r.status_code == 422
    assert await search(client, metadata={"k127": 127}) == [tid]
