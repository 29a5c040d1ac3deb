"""A run start cut short never blocks its thread, and the worker survives its queue vanishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_protocol import start, subscription, until_terminal, user
from tests.integration.test_stream import (
    expected_text,
    message_text,
    new_thread,
    run_body,
    stream_run,
    wait_status,
)
from tests.integration.test_worker import body as worker_body
from tests.server import Tokenrelay, WorkerProcess, serving
from tests.sse import events
from tokenrelay.broker import codec
from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis, free_port
from tokenrelay.broker.graphs import GraphRegistry, open_checkpointer
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import Job, RunStatus
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.broker.settings import Settings
from tokenrelay.producer.worker import Worker

pytestmark = [pytest.mark.timeout(120)]


async def test_a_run_that_never_reached_the_queue_is_repaired(redis_server: RedisServer) -> None:
    s = make_settings(redis_server)
    api = Tokenrelay(s, with_worker=False).start()
    keys = Keys(s.key_prefix)
    redis = connect(s.resolved_redis_url())
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
            tid = await new_thread(c)
            lost = (await c.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
            # As if its start had been cut short between claiming the thread and queueing it
            # (Redis refused the enqueue, the process died): the thread points at a pending
            # run that no worker will ever see.
            await redis.delete(keys.queue())
            await redis.hset(keys.run_meta(lost["run_id"]), "created_at", now_ms() - 60_000)
            await redis.set(keys.thread_since(tid), now_ms() - 60_000)
            assert (await c.get(f"/threads/{tid}")).json()["status"] == "busy"
            # A client joining the thread, or starting the next run, frees it.
            assert (await c.get(f"/threads/{tid}/stream")).status_code == 204
            nxt = await c.post(f"/threads/{tid}/runs", json=run_body("fast"))
            assert nxt.status_code == 200
            got = (await c.get(f"/threads/{tid}/runs/{lost['run_id']}")).json()
            assert got["status"] == "error"
            stream = f"/threads/{tid}/runs/{lost['run_id']}/stream"
            async with c.stream("GET", stream, headers={"Last-Event-ID": "-1"}) as r:
                evts = await events(r)
            assert [e.event for e in evts] == ["error"]
            assert evts[0].json()["error"] == "RunNotQueued"
    finally:
        await redis.aclose()
        api.stop()


async def test_runs_queued_behind_a_start_cut_short_go_on(redis_server: RedisServer) -> None:
    """The next run is queued behind a run whose start was cut short a moment ago (its API
    process died between claiming the thread and queueing it): too fresh to be taken for lost
    then, so the readers waiting on the queued run free the thread once it is stale."""
    s = make_settings(redis_server)
    relay = Tokenrelay(s).start()
    redis = connect(s.resolved_redis_url())
    runs = RunStore(redis, Keys(s.key_prefix), ttl_seconds=600)

    async def cut_short(tid: str) -> str:
        rid, ts = new_id(), now_ms()
        await runs.create(RunRecord(rid, tid, "fast", RunStatus.PENDING, ts, ts))
        assert await runs.claim_thread(tid, rid, enqueue=False, mark_busy=True) == ("started", "")
        return rid  # and never queued

    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=60) as c:
            tids = [await new_thread(c) for _ in range(3)]
            # The next run on each thread: its stream, /wait, and the streaming protocol.
            lost = [await cut_short(tids[0])]
            url = f"/threads/{tids[0]}/runs/stream"
            async with c.stream("POST", url, json=run_body("fast")) as r:
                assert r.status_code == 200
                evts = await events(r)
            assert evts[-1].event == "values"
            lost.append(await cut_short(tids[1]))
            nxt = (await c.post(f"/threads/{tids[1]}/runs/wait", json=run_body("fast"))).json()
            assert nxt["messages"][-1]["type"] == "ai"
            lost.append(await cut_short(tids[2]))
            async with subscription(c, tids[2]) as envelopes:
                await start(c, tids[2], "fast", user("hi"))
                got = await until_terminal(envelopes)
            assert got[-1]["params"]["data"]["event"] == "completed"
            for tid, rid in zip(tids, lost, strict=True):
                assert (await c.get(f"/threads/{tid}/runs/{rid}")).json()["status"] == "error"
    finally:
        await redis.aclose()
        relay.stop()


async def test_a_run_just_promoted_is_not_taken_for_lost(redis_server: RedisServer) -> None:
    """A run promoted from the thread's queue is active a moment before its worker queues it,
    however long it waited. Neither the next run's start nor a reader waiting behind it, idle
    at that moment, may end it."""
    s = make_settings(redis_server)
    api = Tokenrelay(s, with_worker=False).start()
    keys = Keys(s.key_prefix)
    redis = connect(s.resolved_redis_url())
    runs = RunStore(redis, keys, ttl_seconds=600)
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as c:
            tid = await new_thread(c)
            ts = now_ms() - 60_000  # both were created a minute ago
            first, waited = new_id(), new_id()
            for rid in (first, waited):
                await runs.create(RunRecord(rid, tid, "fast", RunStatus.PENDING, ts, ts))
            assert await runs.claim_thread(tid, first, enqueue=False, mark_busy=True) == (
                "started",
                "",
            )
            assert await runs.claim_thread(tid, waited, enqueue=True, mark_busy=True) == (
                "queued",
                "",
            )
            # The first run ends: its worker releases the thread, which promotes the waiting
            # run, and queues that run a round trip later.
            assert await runs.release_active(tid, first) == waited
            nxt = (await c.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
            url = f"/threads/{tid}/runs/{nxt['run_id']}/stream"
            async with c.stream("GET", url, headers={"Last-Event-ID": "-1"}) as r:
                assert r.status_code == 200
                await asyncio.sleep(1.5 * s.heartbeat_seconds)  # an idle heartbeat sees it
                promoted = await runs.get(waited)
                await RunQueue(redis, keys).enqueue(runs.job(promoted))
                await asyncio.sleep(2.5 * s.heartbeat_seconds)  # more heartbeats
            assert (await c.get(f"/threads/{tid}/runs/{waited}")).json()["status"] == "pending"
    finally:
        await redis.aclose()
        api.stop()


async def test_worker_recreates_its_queue_when_it_vanishes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    s: Settings = make_settings(redis_server)
    api = Tokenrelay(s, with_worker=False).start()
    worker = WorkerProcess(s, tmp_path / "worker.log").start()
    redis = connect(s.resolved_redis_url())
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
            tid = await new_thread(c)
            evts, _ = await stream_run(c, tid, run_body("fast"))
            assert evts[-1].event == "values"
            queue = Keys(s.key_prefix).queue()
            for i in range(3):  # the worker is blocked reading the queue when it goes
                await redis.delete(queue)
                while worker.log_path.read_text().count("recreating") <= i:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                # The worker logs before it recreates the queue: deleted again in between, the
                # queue would be recreated after that deletion, which nobody would then notice.
                while not await redis.exists(queue):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert worker.proc is not None and worker.proc.poll() is None
            runs: list[Any] = []
            for _ in range(3):
                tid = await new_thread(c)
                run = (await c.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
                runs.append((tid, run["run_id"]))
            for tid, rid in runs:
                await wait_status(c, tid, rid, "success")
    finally:
        await redis.aclose()
        worker.stop()
        api.stop()


async def test_a_running_run_whose_job_vanished_is_repaired(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    s = make_settings(redis_server)
    async with serving(s) as (c, redis):
        tid = await new_thread(c)
        url = f"/threads/{tid}/runs/stream"
        async with c.stream("POST", url, json=run_body("twostep")) as r:  # 5 s of tokens
            head = await events(r, limit=3)
            await redis.delete(Keys(s.key_prefix).queue())
            # The worker's next lease renewal finds its job gone and stops the run.
            while "writing nothing more" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        run_id = head[0].json()["run_id"]
        assert (await c.get(f"/threads/{tid}/runs/{run_id}")).json()["status"] == "running"
        nxt = await c.post(f"/threads/{tid}/runs", json=run_body("fast"))
        assert nxt.status_code == 200
        await wait_status(c, tid, run_id, "error")
        await wait_status(c, tid, nxt.json()["run_id"], "success")
        replay = [e async for e in _replay(c, tid, run_id)]
        assert replay[-1].event == "error" and replay[-1].json()["error"] == "RunNotQueued"


async def _replay(c: httpx.AsyncClient, tid: str, run_id: str) -> Any:
    url = f"/threads/{tid}/runs/{run_id}/stream"
    async with c.stream("GET", url, headers={"Last-Event-ID": "-1"}) as r:
        for e in await events(r):
            yield e


async def test_a_handed_back_run_is_not_taken_for_lost(
    client: httpx.AsyncClient, workers: Any
) -> None:
    first = workers()
    tid = await new_thread(client)
    run = (await client.post(f"/threads/{tid}/runs", json=worker_body("twostep"))).json()
    while "run started" not in first.log_path.read_text():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    first.signal(signal.SIGTERM)  # the run outlasts the grace period: handed back
    first.wait()
    assert "handed back" in first.log_path.read_text()
    # With no worker, a run queued behind it looks at the active run: it is queued, not lost.
    body = {**worker_body("fast"), "multitask_strategy": "enqueue"}
    nxt = (await client.post(f"/threads/{tid}/runs", json=body)).json()
    got = (await client.get(f"/threads/{tid}/runs/{run['run_id']}")).json()
    assert got["status"] == "pending"
    workers()
    await wait_status(client, tid, run["run_id"], "success")
    await wait_status(client, tid, nxt["run_id"], "success")


@contextlib.asynccontextmanager
async def _claimed_in_setup(
    caplog: pytest.LogCaptureFixture, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Settings, Worker, str, str]]:
    """A worker in this process that took a run's job, then lost Redis (kill -9; an AOF kept
    the run and its queue entry) while it set up the run's attempt: the caller brings Redis
    back (`server.start()` through the yielded worker's `aof_server` attribute)."""
    server = EmbeddedRedis(
        port=free_port(), extra_args=["--appendonly", "yes", "--appendfsync", "always"]
    ).start()
    s = make_settings(server, **settings)  # type: ignore[arg-type]
    api = Tokenrelay(s, with_worker=False).start()
    redis = connect(s.resolved_redis_url())
    try:
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=30) as c,
            open_checkpointer("memory") as saver,
        ):
            tid = await new_thread(c)
            run = (await c.post(f"/threads/{tid}/runs", json=run_body("fast"))).json()
            worker = Worker(redis, s, GraphRegistry(s.graphs, saver))
            await worker.queue.ensure_group()
            [(msg_id, job)] = await worker.queue.claim(worker.id, 1, block_ms=1000)
            worker.publisher.start()
            try:
                server.kill()
                worker._start(msg_id, job)
                while "while starting the run" not in caplog.text:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                worker.aof_server = server  # type: ignore[attr-defined]
                yield c, s, worker, tid, run["run_id"]
            finally:
                await worker.publisher.stop()
    finally:
        await redis.aclose()
        api.stop()
        server.close()


async def _replayed(c: httpx.AsyncClient, tid: str, run_id: str) -> list[Any]:
    url = f"/threads/{tid}/runs/{run_id}/stream"
    async with c.stream("GET", url, headers={"Last-Event-ID": "-1"}) as r:
        return await events(r)


async def test_a_run_whose_start_meets_redis_down_starts_once_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with _claimed_in_setup(caplog) as (c, _, worker, tid, rid):
        worker.aof_server.start()  # type: ignore[attr-defined]
        await wait_status(c, tid, rid, "success")
        evts = await _replayed(c, tid, rid)
        assert evts[0].event == "metadata" and evts[0].json()["attempt"] == 1
        assert message_text(evts) == expected_text()


async def test_a_worker_drained_while_a_run_is_set_up_hands_the_run_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "tokenrelay.worker")
    async with _claimed_in_setup(caplog, shutdown_grace_seconds=0.1) as (c, s, worker, tid, rid):
        drain = asyncio.create_task(worker._drain(asyncio.Event()))
        while worker._running[rid].stop_reason != "handback":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        worker.aof_server.start()  # type: ignore[attr-defined]
        await drain
        assert "run handed back to the queue" in caplog.text
        assert (await c.get(f"/threads/{tid}/runs/{rid}")).json()["status"] == "pending"
        # The job is back in the queue at once (no lease to wait out): the next worker runs it.
        nxt = Worker(worker._redis, s, worker.registry)
        [(msg_id, job)] = await nxt.queue.claim(nxt.id, 1, block_ms=1000)
        nxt.publisher.start()
        try:
            nxt._start(msg_id, job)
            await wait_status(c, tid, rid, "success")
        finally:
            await nxt.publisher.stop()
        evts = await _replayed(c, tid, rid)
        assert [e.json()["attempt"] for e in evts if e.event == "metadata"] == [1, 2]
        assert message_text(evts) == expected_text()


async def test_jobs_put_off_are_queued_once_however_many_workers_promote_them(
    redis_server: RedisServer,
) -> None:
    """Workers racing to queue the same due jobs (`after_seconds`) queue each exactly once; a
    job not yet due stays apart, and the thread repair still finds it."""
    s = make_settings(redis_server)
    keys = Keys(s.key_prefix)
    clients = [connect(s.resolved_redis_url()) for _ in range(4)]
    try:
        queue = RunQueue(clients[0], keys)
        due = [Job(new_id(), new_id(), "agent", not_before=now_ms() + 50) for _ in range(60)]
        later = Job(new_id(), new_id(), "agent", not_before=now_ms() + 600_000)
        before = await clients[0].xlen(keys.queue())
        for job in [*due, later]:
            assert await queue.enqueue(job) == b""  # put off: not in the queue yet
        assert await clients[0].xlen(keys.queue()) == before
        await asyncio.sleep(0.1)  # the 60 jobs are due
        moved = await asyncio.gather(
            *(RunQueue(c, keys).promote_due(limit=100) for c in clients for _ in range(3))
        )
        assert sum(moved) == len(due)
        rows = await clients[0].xrange(keys.queue(), count=10_000)
        queued = [codec.unpack(fields[b"j"])["run_id"] for _, fields in rows]
        assert sorted(r for r in queued if r in {j.run_id for j in due}) == sorted(
            j.run_id for j in due
        )
        assert await queue.contains(later.run_id)  # waiting apart, so not repaired away
        assert await clients[0].zcard(keys.queue_delayed()) == 1
    finally:
        for c in clients:
            await c.aclose()
