"""A write whose reply is lost lands twice: redis-py sends it again on a new connection, and the
relay's own steps try again. Each must answer the second time as it did the first, so the client
sees one thread, one run, one attempt, one promotion.

The Redis here sits behind `tests.lossy.LossyRedis`, which lets an armed command through and cuts
its connection before the reply comes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any, NamedTuple

import httpx
import pytest

from tests.conftest import make_settings
from tests.integration.test_stream import (
    expected_text,
    join,
    message_text,
    new_thread,
    run_body,
    stream_run,
    wait_status,
)
from tests.lossy import LossyRedis, lossy
from tests.server import Tokenrelay
from tokenrelay.broker import scripts, telemetry
from tokenrelay.broker.connection import RedisClient, connect
from tokenrelay.broker.embedded import EmbeddedRedis
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import END_EVENT, Job, RunStatus
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.broker.scripts import RoundTrip
from tokenrelay.broker.threads import ThreadStore

pytestmark = [pytest.mark.timeout(120)]


def sha(name: str) -> bytes:
    return scripts.script(name).sha.encode()


async def load_scripts(url: str) -> None:
    """Every script known to Redis first: a reply lost must be the one of the call that did the
    work, not of a call answered NOSCRIPT."""
    redis = connect(url)
    try:
        for entry in files(scripts.__name__).iterdir():
            if entry.name.endswith(".lua"):
                await scripts.script(entry.name[:-4]).load(redis)
    finally:
        await redis.aclose()


@pytest.fixture
async def proxy(own_redis: EmbeddedRedis) -> AsyncIterator[LossyRedis]:
    await load_scripts(own_redis.url)
    with lossy(own_redis.port) as p:
        yield p


class Relay(NamedTuple):
    client: httpx.AsyncClient
    keys: Keys
    redis: RedisClient
    """A client of the Redis itself, not through the proxy."""


@contextlib.asynccontextmanager
async def relay(
    proxy: LossyRedis, own_redis: EmbeddedRedis, *, with_worker: bool = True, **settings: Any
) -> AsyncIterator[Relay]:
    """tokenrelay (API, and a worker unless told otherwise) on the Redis behind `proxy`."""
    s = make_settings(own_redis, redis_url=proxy.url, **settings)
    server = Tokenrelay(s, with_worker=with_worker).start()
    redis = connect(own_redis.url)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            yield Relay(c, Keys(s.key_prefix), redis)
    finally:
        await redis.aclose()
        server.stop()


async def two_runs(c: httpx.AsyncClient, assistant: str) -> tuple[str, Any, Any]:
    """A new thread, a run of `assistant` on it and a run queued behind that one."""
    tid = await new_thread(c)
    first = (await c.post(f"/threads/{tid}/runs", json=run_body(assistant))).json()
    body = run_body("fast", multitask_strategy="enqueue")
    queued = (await c.post(f"/threads/{tid}/runs", json=body)).json()
    assert queued["status"] == "pending"
    return tid, first, queued


async def test_a_thread_made_with_its_id_whose_reply_is_lost_is_made_once(
    proxy: LossyRedis, own_redis: EmbeddedRedis
) -> None:
    async with relay(proxy, own_redis, with_worker=False) as (c, _, _):
        tid = new_id()
        proxy.arm(sha("create_thread"))
        r = await c.post("/threads", json={"thread_id": tid, "metadata": {"k": "v"}})
        assert proxy.lost == [sha("create_thread")]
        assert r.status_code == 200, r.text
        got = await c.get(f"/threads/{tid}")
        assert got.status_code == 200 and got.json()["metadata"] == {"k": "v"}
        # Another creation of the same id is still refused.
        again = await c.post("/threads", json={"thread_id": tid, "metadata": {"k": "w"}})
        assert again.status_code == 409, again.text


async def test_a_run_whose_start_replies_are_lost_runs_once_as_attempt_1(
    proxy: LossyRedis, own_redis: EmbeddedRedis
) -> None:
    async with relay(proxy, own_redis) as (c, _, _):
        tid = await new_thread(c)
        # The API's round trip that records the run and claims its thread, then the
        # worker's that starts its attempt.
        proxy.arm(sha("claim_thread"))
        proxy.arm(sha("start_attempt"))
        evts, _ = await stream_run(c, tid, run_body("fast"))
        assert sorted(proxy.lost) == sorted([sha("claim_thread"), sha("start_attempt")])
        metadata = [e.json() for e in evts if e.event == "metadata"]
        assert [m["attempt"] for m in metadata] == [1], metadata
        assert message_text(evts) == expected_text()
        rid = metadata[0]["run_id"]
        await wait_status(c, tid, rid, "success")
        runs = (await c.get(f"/threads/{tid}/runs")).json()
        assert [r["run_id"] for r in runs] == [rid]
        assert (await c.get(f"/threads/{tid}")).json()["status"] == "idle"


async def test_a_job_whose_delivery_is_lost_starts_before_its_lease_lapses(
    proxy: LossyRedis, own_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's blocking read of the queue is cut after Redis handed it the job, so the job
    sits in the worker's pending entries and redis-py's resend of the read gets nothing. Its
    next heartbeat finds the job it never started and starts it as attempt 1; no takeover
    after a lease is needed."""
    lease = 6.0
    taken_over = telemetry.RUNS_RECLAIMED._value.get()
    async with relay(proxy, own_redis, lease_seconds=lease) as (c, _, _):
        warm = await new_thread(c)
        await c.post(f"/threads/{warm}/runs/wait", json=run_body("fast"))  # the worker is up
        tid = await new_thread(c)
        # Each read blocks for up to 500 ms: the run is queued while an armed one waits.
        proxy.arm(b"XREADGROUP", times=3)
        for _ in range(200):
            if proxy.lost:
                break
            await asyncio.sleep(0.01)
        assert proxy.lost == [b"XREADGROUP"]
        run = (await c.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
        await wait_status(c, tid, run["run_id"], "success")
        evts = await join(c, tid, run["run_id"], "-1")
        assert [e.json()["attempt"] for e in evts if e.event == "metadata"] == [1]
        assert message_text(evts) == expected_text()
    adopted = [r for r in caplog.records if "delivery to this worker was lost" in r.message]
    assert [r.run_id for r in adopted] == [run["run_id"]]  # type: ignore[attr-defined]
    assert telemetry.RUNS_RECLAIMED._value.get() == taken_over


async def test_a_release_whose_reply_is_lost_still_starts_the_run_queued_behind(
    proxy: LossyRedis, own_redis: EmbeddedRedis
) -> None:
    async with relay(proxy, own_redis) as (c, _, _):
        tid, first, queued = await two_runs(c, "slow")
        proxy.arm(sha("release_active"))
        await wait_status(c, tid, first["run_id"], "success")
        await wait_status(c, tid, queued["run_id"], "success")
        assert proxy.lost == [sha("release_active")]
        assert (await c.get(f"/threads/{tid}")).json()["status"] == "idle"


async def test_a_cancel_of_a_queued_run_whose_reply_is_lost_promotes_the_next(
    proxy: LossyRedis, own_redis: EmbeddedRedis
) -> None:
    async with relay(proxy, own_redis, with_worker=False) as (c, keys, redis):
        tid, run, behind = await two_runs(c, "fast")
        # No worker: the cancel ends the run in place (its end appended by the API).
        proxy.arm(sha("append"))
        r = await c.post(f"/threads/{tid}/runs/{run['run_id']}/cancel", params={"wait": 1})
        assert proxy.lost == [sha("append")]
        assert r.status_code == 200 and r.json()["status"] == "interrupted", r.text
        rows = await redis.xrange(keys.run_events(run["run_id"]))
        assert [f[b"e"] for _, f in rows] == [END_EVENT.encode()]
        # The run queued behind it is the thread's active run now, and queued for a worker.
        assert await redis.get(keys.thread_active(tid)) == behind["run_id"].encode()
        jobs = await redis.xrange(keys.queue())
        assert sum(behind["run_id"].encode() in f[b"j"] for _, f in jobs) == 1


async def test_each_step_answers_again_as_it_did_the_first_time(own_redis: EmbeddedRedis) -> None:
    """The scripts themselves, called twice with the same arguments (what a resend does), and
    the calls that must still be told apart from a resend."""
    keys = Keys(f"t{new_id()[:8]}")
    redis = connect(own_redis.url)
    runs = RunStore(redis, keys, ttl_seconds=600)
    threads = ThreadStore(redis, keys)
    try:
        tid = (await threads.create()).thread_id
        ts = now_ms()
        run, behind = (RunRecord(new_id(), tid, "agent", RunStatus.PENDING, ts, ts) for _ in "ab")
        await runs.create(run)
        await runs.create(behind)
        claim = [run.run_id, behind.run_id]
        for _ in range(2):
            assert await runs.claim_thread(tid, claim[0], enqueue=False, mark_busy=False) == (
                "started",
                "",
            )
        for _ in range(2):
            assert await runs.claim_thread(tid, claim[1], enqueue=True, mark_busy=False) == (
                "queued",
                "",
            )
        assert await redis.lrange(keys.thread_pending(tid), 0, -1) == [behind.run_id.encode()]

        start = runs.start_attempt
        assert await start(run.run_id, "w1", 3, b"1-1") == ("run", 1, 0)
        assert await start(run.run_id, "w1", 3, b"1-1") == ("run", 1, 0)  # sent again
        assert await start(run.run_id, "w1", 3, b"1-2") == ("done", 0, 0)  # queued twice
        assert await start(run.run_id, "w2", 3, b"1-1") == ("run", 2, 0)  # a takeover

        async def release(token: str) -> str | None:
            trip = RoundTrip(redis)
            at = runs.release_active_in(trip, tid, run.run_id, token)
            return RunStore.promoted_of((await trip.execute())[at])

        assert await release("a") == behind.run_id
        assert await release("a") == behind.run_id  # sent again
        assert await release("b") is None  # another release of the same run: nothing to do
        assert await redis.get(keys.thread_active(tid)) == behind.run_id.encode()
    finally:
        await redis.aclose()


async def test_takeovers_wait_a_lease_after_nobody_could_reach_redis(
    own_redis: EmbeddedRedis,
) -> None:
    """The lease clock itself: a job whose owner stopped renewing is taken after its lease
    while workers read the clock; after a gap in the readings, only a lease later."""
    keys = Keys(f"t{new_id()[:8]}")
    redis = connect(own_redis.url)
    queue = RunQueue(redis, keys)
    lease, stall = 600, 300

    async def reclaim(count: int = 10) -> list[str]:
        taken = await queue.reclaim("b", lease, count, stall)
        for msg_id, _ in taken:
            await queue.ack(msg_id, "b")  # done with it
        return [job.run_id for _, job in taken]

    try:
        await queue.ensure_group()
        for run_id in ("r1", "r2"):
            await queue.enqueue(Job(run_id, "t", "agent"))
        assert [job.run_id for _, job in await queue.claim("a", 1, 0)] == ["r1"]
        # Readings every 100 ms: r1 is taken once its lease is over, not before.
        taken: list[str] = []
        for _ in range(9):
            taken += await reclaim()
            await asyncio.sleep(0.1)
        assert taken == ["r1"]
        assert [job.run_id for _, job in await queue.claim("a", 1, 0)] == ["r2"]
        await asyncio.sleep(0.8)  # no reading for longer than `stall`, r2's lease over
        assert await reclaim() == []
        await asyncio.sleep(0.2)
        assert await reclaim(0) == []  # with no room: a reading, nothing taken
        assert await reclaim() == []  # still held
        await asyncio.sleep(0.2)
        assert await reclaim() == []
        await asyncio.sleep(0.25)  # the hold (a lease from the gap) is over
        assert await reclaim() == ["r2"]
    finally:
        await redis.aclose()
