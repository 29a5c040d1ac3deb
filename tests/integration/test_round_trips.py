"""What starting a run costs the API and the worker in Redis round trips (each one is a turn of
an event loop and the client's CPU to pack and parse, on the path to a run's first token), and
that the writes sent together still land in the order a reader relies on."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from redis.asyncio.connection import AbstractConnection

from tests.conftest import RedisServer, make_settings
from tests.integration.test_aisdk import chat_body
from tests.integration.test_run_end import _ended
from tests.integration.test_stream import run_body
from tests.server import Tokenrelay
from tests.sse import events
from tokenrelay.api.fanout import Fanout
from tokenrelay.broker import scripts
from tokenrelay.broker.connection import connect
from tokenrelay.broker.graphs import GraphRegistry
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import EventLog
from tokenrelay.broker.models import END_EVENT, Event, RunStatus
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.broker.threads import RUN_STARTED
from tokenrelay.producer.worker import Worker

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


async def test_a_run_on_a_new_thread_is_recorded_and_queued_in_three_round_trips(
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
            # The thread (a new id: no HSETNX first) with its index entries; the run (its hash,
            # listed on the thread) with the thread's claim (one script); then, together, the
            # busy mark and the queue entry.
            assert used == 3
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


@pytest.mark.parametrize("kind", ["classic", "ai-sdk"])
async def test_a_streamed_new_run_reads_no_history_before_its_first_event(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Its channel is subscribed before it is queued, so what its worker writes reaches the
    stream live: no page of history is read for it (`POST /runs/stream`, or the AI SDK's
    `POST /ai/chat`)."""
    settings = make_settings(redis_server)
    server = Tokenrelay(settings, with_worker=False).start()
    redis = connect(redis_server.url)
    log = EventLog(redis, Keys(settings.key_prefix), maxlen=1000, ttl_seconds=600)
    pages: list[str] = []
    page_rows = EventLog.page_rows

    async def counted(self: EventLog, run_id: str, *args: Any, **kwargs: Any) -> Any:
        pages.append(run_id)
        return await page_rows(self, run_id, *args, **kwargs)

    monkeypatch.setattr(EventLog, "page_rows", counted)
    joins: list[bytes] = []
    join = Fanout._join

    def joined(self: Fanout, name: bytes, sub: Any) -> Any:
        joins.append(name)
        return join(self, name, sub)

    monkeypatch.setattr(Fanout, "_join", joined)
    paths = {"classic": "/runs/stream", "ai-sdk": "/ai/chat"}
    bodies = {"classic": run_body(), "ai-sdk": chat_body(f"chat-{new_id()}", "hi")}
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as c,
            c.stream("POST", paths[kind], json=bodies[kind]) as r,
        ):
            assert r.status_code == 200
            run_id = r.headers["Content-Location"].rsplit("/", 1)[-1]
            channel = Keys(settings.key_prefix).live(run_id).encode()
            for _ in range(500):  # the stream has joined the run's channel (its start, too)
                if joins.count(channel) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert joins.count(channel) == 2
            # What the run's worker would write.
            head = [Event("metadata", b'{"run_id": "x"}'), Event("custom", b"{}")]
            await log.append(run_id, head, status=RunStatus.RUNNING)
            end = [Event("values", b"{}"), Event(END_EVENT, b"")]
            await log.append(run_id, end, status=RunStatus.SUCCESS)
            evts = await events(r)
        if kind == "classic":
            assert [e.event for e in evts] == ["metadata", "custom", "values"]
        else:
            parts = [e.data for e in evts]
            assert parts[0].startswith('{"type":"start"') and parts[-1] == "[DONE]"
        assert run_id not in pages
    finally:
        await redis.aclose()
        server.stop()


async def test_a_worker_begins_a_run_and_numbers_it_in_two_round_trips(
    redis_server: RedisServer, round_trips: dict[int, int]
) -> None:
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    worker = Worker(redis, s, GraphRegistry({}, None), worker_id="w1")
    keys = Keys(s.key_prefix)
    listener = redis.pubsub(ignore_subscribe_messages=True)
    try:
        await worker.queue.ensure_group()
        tid = (await worker.threads.create()).thread_id
        await worker.threads.advance_seq(tid, 7)  # the thread's earlier runs wrote seq 1..7
        ts = now_ms()
        run = RunRecord(new_id(), tid, "agent", RunStatus.PENDING, ts, ts)
        await worker.queue.enqueue(await worker.runs.create(run))
        assert await worker.runs.claim_thread(tid, run.run_id, enqueue=False, mark_busy=True) == (
            "started",
            "",
        )
        [(msg_id, job)] = await worker.queue.claim(worker.id, 1, block_ms=100)
        await listener.subscribe(keys.thread_live(tid))
        await scripts.script("start_attempt").load(redis)  # only the steps' own trips count
        me = threading.get_ident()

        before = round_trips.get(me, 0)
        (verdict, attempt, seq), after = await worker._begin(msg_id, job)
        assert round_trips.get(me, 0) - before == 1
        assert (verdict, attempt, seq, after) == ("run", 1, 0, 7)

        before = round_trips.get(me, 0)
        meta = await worker._number(job, after)
        assert round_trips.get(me, 0) - before == 1
        numbered = RunStore.record(run.run_id, meta)
        assert (numbered.status, numbered.attempt, numbered.seq_base) == (RunStatus.RUNNING, 1, 8)
        # The thread's protocol subscribers were told, once the run was numbered.
        message = None
        for _ in range(50):  # the subscription's confirmation comes first, read as None
            message = await listener.get_message(timeout=0.1)
            if message is not None:
                break
        assert message is not None and message["data"] == RUN_STARTED
    finally:
        await listener.aclose()
        await redis.aclose()


async def test_what_follows_a_runs_end_takes_three_round_trips(
    redis_server: RedisServer, round_trips: dict[int, int]
) -> None:
    """The run's last seq and its thread read, the thread released, the job acknowledged with
    the thread out of the busy index: the thread's pointer, read for a run claimed meanwhile,
    goes with the last of these."""
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    worker = Worker(redis, s, GraphRegistry({}, None), worker_id="w1")
    try:
        tid, _, msg_id, job = await _ended(worker, queued_behind=False)
        for name in ("release_active", "ack_job", "advance_seq"):  # only the steps' own trips
            await scripts.script(name).load(redis)
        me = threading.get_ident()
        before = round_trips.get(me, 0)
        await worker._after_end(msg_id, job, RunStatus.SUCCESS, {})
        assert round_trips.get(me, 0) - before == 3
        assert await worker.runs.active_pointer(tid) is None
        assert await redis.zscore(worker.keys.threads_with_status("busy"), tid) is None
        assert not await worker.queue.holds(msg_id.decode())
    finally:
        await redis.aclose()


async def test_what_a_reader_looks_up_lands_before_what_leads_a_reader_to_it(
    redis_server: RedisServer,
) -> None:
    """Writes sent together in one round trip take effect in the order they were queued; what
    Redis applied, in order, is what MONITOR shows. A reader that finds a thread in the index
    reads its fields, one that finds a run on its thread reads its hash, the run's end unmarks
    the thread busy, and a protocol subscriber woken by a run's start reads its number: each of
    these goes first."""
    settings = make_settings(redis_server)
    server = Tokenrelay(settings, with_worker=False).start()
    redis = connect(redis_server.url)
    keys = Keys(settings.key_prefix)
    seen: list[list[str]] = []
    watching = asyncio.Event()

    async def watch() -> None:
        async with redis.monitor() as monitor:
            watching.set()
            while True:
                seen.append((await monitor.next_command())["command"].split())

    watcher = asyncio.create_task(watch())
    worker = Worker(redis, settings, GraphRegistry({}, None), worker_id="w1")
    try:
        await asyncio.wait_for(watching.wait(), 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            r = await c.post("/runs", json=run_body())
            assert r.status_code == 200, r.text
        tid, rid = r.json()["thread_id"], r.json()["run_id"]
        await worker.queue.ensure_group()
        [(msg_id, job)] = await worker.queue.claim(worker.id, 1, block_ms=1000)
        (verdict, _, _), after = await worker._begin(msg_id, job)
        assert verdict == "run"
        await worker._number(job, after)
        await redis.echo("watched")
        for _ in range(100):
            if ["ECHO", "watched"] in seen:
                break
            await asyncio.sleep(0.05)

        def first(command: str, key: str, *args: str) -> int:
            for i, seen_command in enumerate(seen):
                if seen_command[0].upper() == command and seen_command[1 : 2 + len(args)] == [
                    key,
                    *args,
                ]:
                    return i
            raise AssertionError(f"no {command} {key} {args} in {seen}")

        assert first("HSET", keys.thread_meta(tid)) < first("ZADD", keys.threads_index())
        assert first("HSET", keys.run_meta(rid)) < first("ZADD", keys.thread_runs(tid))
        assert first("ZADD", keys.threads_with_status("busy")) < first("XADD", keys.queue())
        assert first("HSETNX", keys.run_meta(rid), "s0") < first("PUBLISH", keys.thread_live(tid))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await redis.aclose()
        server.stop()
