"""What follows a run's written end on its thread: the thread's seq and status, the release of
its active pointer (promoting a queued run) and the job's ack, even after Redis lost its
scripts."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import new_thread, run_body, stream_run
from tests.server import Tokenrelay
from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis, free_port
from tokenrelay.broker.graphs import GraphRegistry
from tokenrelay.broker.models import END_EVENT, Event, Job, RunStatus
from tokenrelay.broker.runs import RunRecord, new_id, now_ms
from tokenrelay.producer.worker import Worker

pytestmark = pytest.mark.redis("standalone", "cluster")


async def _ended(worker: Worker, queued_behind: bool) -> tuple[str, RunRecord, bytes, Job]:
    """A run whose end is written and whose thread's side of it is not (and, with
    `queued_behind`, a run queued on its thread behind it): the thread, the queued run, the ended
    run's job id and job."""
    await worker.queue.ensure_group()
    tid = (await worker.threads.create()).thread_id
    ts = now_ms()
    ended, queued = (RunRecord(new_id(), tid, "agent", RunStatus.PENDING, ts, ts) for _ in "ab")
    await worker.queue.enqueue(await worker.runs.create(ended))
    assert await worker.runs.claim_thread(tid, ended.run_id, enqueue=False, mark_busy=True) == (
        "started",
        "",
    )
    if queued_behind:
        await worker.runs.create(queued)
        assert await worker.runs.claim_thread(tid, queued.run_id, enqueue=True, mark_busy=True) == (
            "queued",
            "",
        )
    [(msg_id, job)] = await worker.queue.claim(worker.id, 1, block_ms=100)
    assert await worker.runs.start_attempt(ended.run_id, worker.id, 3, msg_id) == ("run", 1, 0)
    await worker.runs.assign_seq_base(ended.run_id, 0)
    end = [Event("custom", b"{}"), Event(END_EVENT, b"")]
    assert await worker.log.append(ended.run_id, end, status=RunStatus.SUCCESS) is None
    return tid, queued, msg_id, job


@pytest.mark.parametrize("queued_behind", [False, True], ids=["alone", "queued-behind"])
async def test_after_a_runs_end_its_thread_is_released_and_its_job_acknowledged(
    redis_server: RedisServer, queued_behind: bool
) -> None:
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    worker = Worker(redis, s, GraphRegistry({}, None), worker_id="w1")
    try:
        tid, queued, msg_id, job = await _ended(worker, queued_behind)
        await redis.script_flush()  # Redis lost its scripts (a restart, a failover)

        await worker._after_end(msg_id, job, RunStatus.SUCCESS, {})

        assert await worker.threads.last_seq(tid) == 2  # the next run numbers after `end`
        assert await worker.threads.last_status(tid) == "idle"
        assert not await worker.queue.holds(msg_id.decode())
        busy = await redis.zscore(worker.keys.threads_with_status("busy"), tid)
        if queued_behind:
            assert await worker.runs.active_pointer(tid) == queued.run_id
            assert busy is not None
            [(_, promoted)] = await worker.queue.claim("w2", 1, block_ms=100)
            assert promoted.run_id == queued.run_id
        else:
            assert await worker.runs.active_pointer(tid) is None
            assert busy is None
    finally:
        await redis.aclose()


async def test_a_run_that_claims_the_thread_as_the_last_one_ends_leaves_it_busy(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run claims the thread after the ended run released it and before its worker takes the
    thread out of the busy index: the thread is marked busy again, as its new run runs."""
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    worker = Worker(redis, s, GraphRegistry({}, None), worker_id="w1")
    try:
        tid, _, msg_id, job = await _ended(worker, queued_behind=False)
        ts = now_ms()
        late = RunRecord(new_id(), tid, "agent", RunStatus.PENDING, ts, ts)
        step = worker._redis_step

        async def claimed_first(fn: Any, ctx: dict[str, object], doing: str = "starting") -> Any:
            if getattr(fn, "__name__", "") == "done":  # the release has landed
                await worker.runs.create(late)
                claim = await worker.runs.claim_thread(tid, late.run_id, enqueue=False,
                                                       mark_busy=True)  # fmt: skip
                assert claim == ("started", "")
            return await step(fn, ctx, doing)

        monkeypatch.setattr(worker, "_redis_step", claimed_first)
        await worker._after_end(msg_id, job, RunStatus.SUCCESS, {})

        assert await worker.runs.active_pointer(tid) == late.run_id
        assert await redis.zscore(worker.keys.threads_with_status("busy"), tid) is not None
    finally:
        await redis.aclose()


async def test_appends_after_redis_lost_its_scripts_go_through_at_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis that does not know the append script (first use, a restart, SCRIPT FLUSH) is
    given it and the append sent again at once: no failure is logged and no retry waited."""
    s = make_settings(redis_server)
    relay = Tokenrelay(s).start()
    redis = connect(s.resolved_redis_url())
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            for _ in range(2):
                await redis.script_flush()
                tid = await new_thread(c)
                evts, _ = await stream_run(c, tid, run_body("fast"))
                assert evts[-1].event == "values"
        assert "append for" not in caplog.text
    finally:
        await redis.aclose()
        relay.stop()


async def test_a_thread_freed_from_a_run_whose_worker_stopped_after_its_end_numbers_on(
    redis_server: RedisServer,
) -> None:
    """The run's end is written, then its worker stops (paused, or Redis went away) before
    the thread's side of it: the next run frees the thread and numbers its events after the
    ended run's, not over them."""
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    worker = Worker(redis, s, GraphRegistry({}, None), worker_id="w1")
    server = Tokenrelay(s).start()
    try:
        await worker.queue.ensure_group()
        tid = (await worker.threads.create()).thread_id
        ts = now_ms()
        ended = RunRecord(new_id(), tid, "fast", RunStatus.PENDING, ts, ts)
        await worker.runs.create(ended)
        assert await worker.runs.claim_thread(tid, ended.run_id, enqueue=False, mark_busy=True) == (
            "started",
            "",
        )
        assert await worker.runs.start_attempt(ended.run_id, "w1", 3) == ("run", 1, 0)
        await worker.runs.assign_seq_base(ended.run_id, 0)
        end = [Event("custom", b"{}"), Event("custom", b"{}"), Event(END_EVENT, b"")]
        assert await worker.log.append(ended.run_id, end, status=RunStatus.SUCCESS) is None
        assert await worker.threads.last_seq(tid) == 0  # the worker stopped here

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            evts, _ = await stream_run(c, tid, run_body())
        assert int((evts[0].id or "").split("-")[0]) == 4  # after the ended run's 1..3
    finally:
        server.stop()
        await redis.aclose()


async def test_what_follows_a_runs_end_waits_out_a_redis_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis goes away between a run's written end and the thread's side of it, and comes back
    (kill -9, an AOF kept everything): the worker's release goes through once it is back."""
    server = EmbeddedRedis(
        port=free_port(), extra_args=["--appendonly", "yes", "--appendfsync", "always"]
    ).start()
    s = make_settings(server)  # type: ignore[arg-type]
    redis = connect(s.resolved_redis_url())
    worker = Worker(redis, s, GraphRegistry({}, None), worker_id="w1")
    try:
        tid, queued, msg_id, job = await _ended(worker, queued_behind=True)

        server.kill()
        after_end = asyncio.create_task(worker._after_end(msg_id, job, RunStatus.SUCCESS, {}))
        while "while ending the run" not in caplog.text and not after_end.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        server.start()
        await after_end  # (it would have raised the ConnectionError)

        assert await worker.threads.last_seq(tid) == 2
        assert await worker.threads.last_status(tid) == "idle"
        assert not await worker.queue.holds(msg_id.decode())
        assert await worker.runs.active_pointer(tid) == queued.run_id
        [(_, promoted)] = await worker.queue.claim("w2", 1, block_ms=100)
        assert promoted.run_id == queued.run_id
    finally:
        await redis.aclose()
        server.close()
