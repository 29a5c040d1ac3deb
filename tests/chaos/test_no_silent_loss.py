"""No silent loss: gaps are reported on every protocol, a missing blob is an error, a run lost
with its Redis answers 410 and is not written back, Redis errors fail a search, and every key
has a TTL or an owner that deletes it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import join, new_thread, run_body, stream_run, wait_status
from tests.server import Tokenrelay, serving
from tests.sse import SSE, events, iter_sse
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.embedded import EmbeddedRedis, free_port
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import RunStatus

pytestmark = [pytest.mark.timeout(120)]


async def test_gaps_reach_ai_sdk_and_missing_blobs_are_errors() -> None:
    # Small stream nodes, so MAXLEN ~ trims a short run's history while it still streams.
    own = EmbeddedRedis(extra_args=["--stream-node-max-entries", "4"]).start()
    s = make_settings(own, stream_maxlen=10)
    try:
        async with serving(s) as (c, redis):
            parts = [{"type": "text", "text": "hi"}]
            chat = {"id": f"chat-{free_port()}", "assistant_id": "slow",
                    "messages": [{"role": "user", "parts": parts}]}  # fmt: skip
            async with c.stream("POST", "/ai/chat", json=chat) as r:
                deltas = 0
                async for line in r.aiter_lines():
                    deltas += '"text-delta"' in line
                    if deltas == 20:
                        break
                # 20 tokens in, a resume replays from the start: trimmed away, and said so.
                resumed: list[str] = []
                async with c.stream("GET", f"/ai/chat/{chat['id']}/stream") as again:
                    assert again.status_code == 200
                    async for line in again.aiter_lines():
                        if line.startswith("data: "):
                            resumed.append(line[6:])
            assert any("StreamGap" in part for part in resumed), resumed[:5]
            assert resumed[-1] == "[DONE]"

            # A finished run whose metadata blobs are gone: errors in their place, not `{}`.
            # It ran unread, so the API holds no copy of its blobs (it keeps those it read).
            tid = await new_thread(c)
            created = await c.post(f"/threads/{tid}/runs", json=run_body("fast"))
            run_id = created.json()["run_id"]
            await wait_status(c, tid, run_id, "success")
            await redis.delete(Keys(s.key_prefix).run_blobs(run_id))
            replay = await join(c, tid, run_id, "-1")
            assert not any(e.event == "messages" for e in replay)
            missing = [e for e in replay if e.event == "error" and e.id is not None]
            assert missing and all(e.json()["error"] == "MissingMetadata" for e in missing)
    finally:
        own.close()


async def test_a_run_lost_with_its_redis_is_410_and_not_written_back(
    own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    s = make_settings(own_redis)
    async with serving(s) as (c, redis):
        tid = await new_thread(c)
        async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
            head = await events(r, limit=3)
            own_redis.kill()
            with pytest.raises(httpx.RemoteProtocolError):
                await events(r)  # aborted: the client would resume
        own_redis.start()  # empty: no persistence
        run_id = head[0].json()["run_id"]
        # The worker finds the run gone when Redis is back, and stops writing it.
        while "writing nothing more" not in caplog.text:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        headers = {"Last-Event-ID": head[-1].id or ""}
        r = await c.get(f"/threads/{tid}/runs/{run_id}/stream", headers=headers)
        assert r.status_code == 410
        assert "restarted without persistence" in r.json()["detail"]
        assert (await c.get(f"/threads/{tid}/runs/{run_id}")).status_code == 410
        assert (await c.get(f"/threads/{tid}/runs/{new_run_id()}")).status_code == 404
        keys = [k async for k in redis.scan_iter(match=f"{s.key_prefix}:*")]
        assert not [k for k in keys if run_id.encode() in k or tid.encode() in k], keys


def new_run_id() -> str:
    from tokenrelay.broker.runs import new_id

    return new_id()


async def test_thread_search_fails_while_redis_is_down(own_redis: EmbeddedRedis) -> None:
    server = Tokenrelay(make_settings(own_redis)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tids = [await new_thread(c) for _ in range(3)]
            assert len((await c.post("/threads/search", json={"ids": tids})).json()) == 3
            own_redis.kill()
            r = await c.post("/threads/search", json={"ids": tids})
            assert r.status_code == 503
            own_redis.start()
    finally:
        server.stop()


async def keys_without_owner(redis: RedisClient, keys: Keys) -> list[str]:
    """Keys under `keys.prefix` with no TTL and no live owner to delete them."""
    orphans: list[str] = []
    async for raw in redis.scan_iter(match=f"{keys.prefix}:*", count=1000):
        key = raw.decode()
        if await redis.ttl(key) != -1:
            continue
        if key == keys.queue():
            continue  # the workers' queue: every job is acknowledged and deleted
        if key.startswith(f"{keys.prefix}:threads:{{threads}}:") and ":q:" not in key:
            # The thread index (by creation, update, status, metadata): each member is removed
            # with its thread, so every member must be a live thread.
            members = [m.decode() for m in await redis.zrange(key, 0, -1)]
            if all([await redis.hexists(keys.thread_meta(m), "created_at") for m in members]):
                continue
        if ":thread:{" in key:
            tid = key.split("{", 1)[1].split("}", 1)[0]
            meta = await redis.hgetall(keys.thread_meta(tid))
            if key == keys.thread_active(tid):
                run_id = (await redis.get(key) or b"").decode()
                status = await redis.hget(keys.run_meta(run_id), "status")
                if status and not RunStatus(status.decode()).terminal:
                    continue  # released when its run ends
            elif meta and b"created_at" in meta and b'"stateless"' not in meta[b"metadata"]:
                continue  # a thread's records, deleted with it (DELETE /threads/{tid})
        orphans.append(key)
    return orphans


async def test_every_key_has_a_ttl_or_an_owner(redis_server: RedisServer) -> None:
    s = make_settings(redis_server)
    async with serving(s) as (c, redis):
        tid = await new_thread(c)
        await stream_run(c, tid, run_body("fast"))
        # stateless runs, streamed, waited on and in the background
        async with c.stream("POST", "/runs/stream", json=run_body("fast")) as r:
            await events(r)
        assert (await c.post("/runs/wait", json=run_body("fast"))).status_code == 200
        bg = (await c.post("/runs", json=run_body("fast"))).json()
        await wait_status(c, bg["thread_id"], bg["run_id"], "success")
        # an interrupted, a rolled back, an enqueued and a rejected run
        for action in ("interrupt", "rollback"):
            run = (await c.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
            url = f"/threads/{tid}/runs/{run['run_id']}"
            async with c.stream("GET", url + "/stream", headers={"Last-Event-ID": "-1"}) as r:
                async for item in iter_sse(r):
                    if isinstance(item, SSE) and item.event == "messages":
                        break
            await c.post(url + "/cancel", params={"wait": 1, "action": action})
        first = (await c.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
        body: dict[str, Any] = {**run_body("fast"), "multitask_strategy": "enqueue"}
        second = (await c.post(f"/threads/{tid}/runs", json=body)).json()
        rejected = await c.post(f"/threads/{tid}/runs", json=run_body("fast"))
        assert rejected.status_code in (200, 409)
        await wait_status(c, tid, first["run_id"], "success")
        await wait_status(c, tid, second["run_id"], "success")
        if rejected.status_code == 200:
            await wait_status(c, tid, rejected.json()["run_id"], "success")
        # a deleted thread takes its records with it
        gone = await new_thread(c)
        await stream_run(c, gone, run_body("fast"))
        assert (await c.delete(f"/threads/{gone}")).status_code == 204
        assert await keys_without_owner(redis, Keys(s.key_prefix)) == []
