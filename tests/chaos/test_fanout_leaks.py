"""Hanging up at any point of a join leaves no live subscription behind: the channel gauge and
Redis's own list of channels come back to where they were."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_api_stream import gauge_reaches, metric
from tests.integration.test_stream import new_thread, run_body, stream_run
from tests.server import Tokenrelay, serving
from tests.sse import events
from tokenrelay.api.fanout import Fanout
from tokenrelay.broker.connection import RedisClient, connect
from tokenrelay.broker.keys import Keys

pytestmark = [pytest.mark.timeout(120)]


async def live_channels(redis: RedisClient, keys: Keys) -> list[bytes]:
    return list(await redis.pubsub_channels(keys.live("*")))


async def settle(redis: RedisClient, keys: Keys, fanout: Fanout | None = None) -> None:
    """Wait until no live channel of `keys` is subscribed any more (bounded)."""
    for _ in range(400):
        if not await live_channels(redis, keys) and (fanout is None or not fanout.channel_count):
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"channels left subscribed: {await live_channels(redis, keys)}")


@pytest.fixture
async def fanout(redis_server: RedisServer) -> AsyncIterator[tuple[Fanout, RedisClient, Keys]]:
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    keys = Keys(s.key_prefix)
    fan = Fanout(redis, keys)
    await fan.start()
    yield fan, redis, keys
    await fan.stop()
    await redis.aclose()


async def test_a_channel_lingers_after_its_last_client_then_is_unsubscribed(
    fanout: tuple[Fanout, RedisClient, Keys],
) -> None:
    """A client that comes back soon after the last one left finds the channel live, with the
    epoch it had (so a resume reads its first page with its lookup); with no client for
    `LINGER_SECONDS` it is unsubscribed."""
    fan, redis, keys = fanout
    async with fan.subscribe("a"):
        epoch = fan.live_epoch("a")
    assert epoch is not None
    assert fan.live_epoch("a") == epoch and fan.client_count == 0
    assert await live_channels(redis, keys) == [keys.live("a").encode()]
    async with fan.subscribe("a") as sub:
        assert sub.joined[0] == epoch  # no new subscribe
    await settle(redis, keys, fan)
    assert fan.live_epoch("a") is None


async def test_cancelled_at_every_step_of_a_subscribe_nothing_leaks(
    fanout: tuple[Fanout, RedisClient, Keys],
) -> None:
    fan, redis, keys = fanout
    entered = 0
    for steps in [*range(40), None]:
        # Several clients of one run, and one of another, cancelled after `steps` turns of the
        # event loop: before, during and after the subscribe and its confirmation; last, once
        # all three are in (how many turns a subscribe takes depends on the machine).
        target, all_in = entered + 3, asyncio.Event()

        async def hold(run_id: str, target: int = target, all_in: asyncio.Event = all_in) -> None:
            nonlocal entered
            async with fan.subscribe(run_id):
                entered += 1
                if entered == target:
                    all_in.set()
                await asyncio.Event().wait()

        tasks = [asyncio.create_task(hold(r)) for r in ("a", "a", "b")]
        if steps is None:
            async with asyncio.timeout(10):
                await all_in.wait()
        for _ in range(steps or 0):
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert fan.client_count == 0
    await settle(redis, keys, fan)  # and the channels, once they have lingered
    assert entered >= 3  # the last round got all the way in before it was cancelled


async def test_clients_hanging_up_at_every_point_of_a_join(redis_server: RedisServer) -> None:
    s = make_settings(redis_server)
    keys = Keys(s.key_prefix)
    async with serving(s) as (c, redis):
        baseline = metric((await c.get("/metrics")).text, "tokenrelay_api_live_channels")
        tid = await new_thread(c)
        done, _ = await stream_run(c, tid, run_body("fast"))
        finished = done[0].json()["run_id"]
        url = f"/threads/{tid}/runs/{finished}/stream"
        # A finished run replayed, hanging up after each number of events, on the last one
        # and before the first byte.
        for k in range(len(done) + 1):
            async with c.stream("GET", url, headers={"Last-Event-ID": "-1"}) as r:
                if k:
                    await events(r, limit=k)
        for _ in range(5):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0):
                    await c.get(url, headers={"Last-Event-ID": "-1"})
        # A live run: joins that hang up mid-history and mid-live.
        tid2 = await new_thread(c)
        async with c.stream("POST", f"/threads/{tid2}/runs/stream", json=run_body("slow")) as r:
            head = await events(r, limit=2)
            live = f"/threads/{tid2}/runs/{head[0].json()['run_id']}/stream"
            for k in (0, 1, 3, 5):
                async with c.stream("GET", live, headers={"Last-Event-ID": "-1"}) as j:
                    if k:
                        await events(j, limit=k)
            rest = await events(r)
        assert rest[-1].event == "values"
        await settle(redis, keys)
        channels = await gauge_reaches(
            c, "tokenrelay_api_live_channels", baseline, tries=100, every=0.05
        )
        assert channels == baseline


async def test_a_client_that_hangs_up_ends_its_stream_at_once(redis_server: RedisServer) -> None:
    """The server tells the stream its client is gone (no write needs to fail, no heartbeat
    to come first): the stream ends while the run, whose events it would otherwise go on
    reading, still streams."""
    server = Tokenrelay(make_settings(redis_server, heartbeat_seconds=60.0)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            baseline = metric((await c.get("/metrics")).text, "tokenrelay_api_streams_open")
            tid = await new_thread(c)
            body = run_body("stubborn")  # 200 tokens, 20 ms apart: about 4 s
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
                run_id = (await events(r, limit=2))[0].json()["run_id"]
            open_streams = "tokenrelay_api_streams_open"
            assert await gauge_reaches(c, open_streams, baseline, tries=40, every=0.025) == baseline
            run = (await c.get(f"/threads/{tid}/runs/{run_id}")).json()
            assert run["status"] == "running", "the run went on; only its stream ended"
    finally:
        server.stop()
