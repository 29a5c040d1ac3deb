"""Bounded reconnect storm and process kills: readers that drop and resume, a join storm of
hundreds of readers resuming at once, a worker killed -9, the API killed -9, Redis restarted
with AOF and Redis paused past the clients' socket timeout all end in a stream byte-equal to a
full replay of the run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.test_fanout_leaks import settle
from tests.conftest import RedisServer, make_settings
from tests.graphs import LONG_WORDS
from tests.integration.test_api_stream import gauge_reaches, metric
from tests.integration.test_stream import join, new_thread, run_body, wait_status
from tests.integration.test_worker import body as worker_body
from tests.integration.test_worker import words
from tests.server import Tokenrelay, WorkerProcess
from tests.sse import SSE, events, iter_sse
from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis, free_port
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.settings import Settings

pytestmark = [pytest.mark.timeout(180)]

RUNS = 30


def frames(evts: list[SSE]) -> list[tuple[str | None, str, str]]:
    """What a client received, exactly: ids, names and payload bytes."""
    return [(e.id, e.event, e.data) for e in evts]


async def dropping_reader(
    urls: list[str], start: tuple[str, dict[str, Any]], rng: random.Random, drop_after: int
) -> tuple[str, str, list[SSE], int]:
    """Start a run on `start`, then hang up after 1..`drop_after` events and resume with
    Last-Event-ID, each time on one of `urls` at random, until the run ends. Returns the thread
    and run ids, what was received and how many times it reconnected."""
    got: list[SSE] = []
    location: str | None = None
    reconnects = 0
    while True:
        budget = rng.randint(1, drop_after)
        ended = True
        if location is None:
            method, url, body, headers = "POST", start[0], start[1], {}
        else:
            last = got[-1].id if got else None
            method, url, body, headers = "GET", location, None, {"Last-Event-ID": last or "-1"}
        try:
            async with (
                httpx.AsyncClient(base_url=rng.choice(urls), timeout=60) as client,
                client.stream(method, url, json=body, headers=headers) as r,
            ):
                if r.status_code == 503 and location is not None:
                    # Redis is unavailable for now: come back when the server says, as the SDKs do.
                    await asyncio.sleep(float(r.headers["retry-after"]))
                    reconnects += 1
                    continue
                assert r.status_code == 200, await r.aread()
                location = location or r.headers["location"]
                async for item in iter_sse(r):
                    if isinstance(item, SSE):
                        got.append(item)
                        budget -= 1
                        if budget == 0:
                            ended = False
                            break  # hang up mid-run
        except httpx.ConnectError:
            ended = False  # that server is gone (killed): nothing was sent, try another
        except (httpx.RemoteProtocolError, httpx.ReadError):
            ended = False  # the server went away mid-response: resume elsewhere
        if ended:
            break
        reconnects += 1
    assert location is not None
    tid, rid = location.split("/")[2], location.split("/")[4]
    return tid, rid, got, reconnects


def readers(
    urls: list[str], tids: list[str], body: dict[str, Any], drop_after: int
) -> list[asyncio.Task[tuple[str, str, list[SSE], int]]]:
    """One `dropping_reader` task per thread, each starting a run with `body`."""
    return [
        asyncio.create_task(
            dropping_reader(
                urls, (f"/threads/{tid}/runs/stream", body), random.Random(i), drop_after
            )
        )
        for i, tid in enumerate(tids)
    ]


async def test_reconnect_storm_is_byte_equal_to_a_full_replay(relay: Tokenrelay) -> None:
    rng = random.Random(20261204)
    async with httpx.AsyncClient(base_url=relay.url, timeout=60) as c:
        tids = [await new_thread(c) for _ in range(RUNS)]
        results = await asyncio.gather(
            *(
                dropping_reader(
                    [relay.url], (f"/threads/{tid}/runs/stream", run_body("slow")),
                    random.Random(rng.random()), drop_after=3,
                )
                for tid in tids
            )
        )  # fmt: skip
        total = sum(r[3] for r in results)
        for tid, rid, got, _ in results:
            reference = await join(c, tid, rid, "-1")
            assert frames(got) == frames(reference)
            assert reference[-1].event == "values"
    assert total >= RUNS * 10  # a storm: every run was resumed many times
    print(f"\n{RUNS} runs, {total} reconnects, every stream byte-equal to its replay")


STORM_RUNS = 8
STORM_READERS = 240


@pytest.mark.redis("standalone", "cluster")
async def test_join_storm_every_resume_is_exact(redis_server: RedisServer) -> None:
    """Hundreds of readers reconnect at the same moment to live runs, each with the
    Last-Event-ID of an event it had read (some from the start, some hanging up again midway):
    each gets exactly the events after its id, byte for byte, and nothing stays subscribed."""
    s = make_settings(redis_server)
    relay = Tokenrelay(s).start()
    redis = connect(s.resolved_redis_url())
    rng = random.Random(1604)
    limits = httpx.Limits(max_connections=STORM_READERS + 20)
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=120, limits=limits) as c:
            baseline = metric((await c.get("/metrics")).text, "tokenrelay_api_live_channels")
            runs: list[tuple[str, str]] = []
            for _ in range(STORM_RUNS):
                tid = await new_thread(c)
                r = await c.post(f"/threads/{tid}/runs", json=run_body("twostep"))
                assert r.status_code == 200, r.text
                runs.append((tid, r.json()["run_id"]))
            # What each run's first readers had before they lost their connections.
            had: list[list[str]] = []
            for tid, rid in runs:
                url = f"/threads/{tid}/runs/{rid}/stream"
                async with c.stream("GET", url, headers={"Last-Event-ID": "-1"}) as r:
                    had.append([str(e.id) for e in await events(r, limit=12)])
            live = [(await c.get(f"/threads/{t}/runs/{r}")).json()["status"] for t, r in runs]

            # Reader i resumes run i % STORM_RUNS after `cursor` ("-1": from the start); with a
            # `limit` it hangs up again after that many events and resumes from the last one.
            plan = [
                (i % STORM_RUNS, "-1" if i % 10 == 0 else rng.choice(had[i % STORM_RUNS]),
                 rng.randint(1, 30) if i % 7 == 0 else None)
                for i in range(STORM_READERS)
            ]  # fmt: skip

            async def resume(run: int, cursor: str, limit: int | None) -> list[SSE]:
                tid, rid = runs[run]
                url = f"/threads/{tid}/runs/{rid}/stream"
                async with c.stream("GET", url, headers={"Last-Event-ID": cursor}) as r:
                    assert r.status_code == 200, await r.aread()
                    got = await events(r, limit=limit)
                if limit is not None:
                    after = got[-1].id if got else cursor
                    async with c.stream("GET", url, headers={"Last-Event-ID": after}) as r:
                        assert r.status_code == 200, await r.aread()
                        got += await events(r)
                return got

            results = await asyncio.gather(*(resume(*p) for p in plan))
            replays = [await join(c, tid, rid, "-1") for tid, rid in runs]
            for (run, cursor, _), got in zip(plan, results, strict=True):
                reference = frames(replays[run])
                start = 0 if cursor == "-1" else [f[0] for f in reference].index(cursor) + 1
                assert frames(got) == reference[start:], f"reader of run {run} after {cursor}"
            assert all(replay[-1].event == "values" for replay in replays)
            assert "running" in live  # the storm met live runs, not only finished ones
            await settle(redis, Keys(s.key_prefix))
            channels = await gauge_reaches(
                c, "tokenrelay_api_live_channels", baseline, tries=100, every=0.05
            )
            assert channels == baseline
    finally:
        await redis.aclose()
        relay.stop()


@pytest.fixture
def settings(redis_server: RedisServer, postgres_url: str) -> Settings:
    return make_settings(redis_server, checkpointer=postgres_url, lease_seconds=1.5)


async def streaming(settings: Settings, tids: list[str], events_in: int = 5) -> None:
    """Wait until each thread's active run has `events_in` events written to its stream (a
    worker logs that a run started before its first events are flushed)."""
    redis = connect(settings.resolved_redis_url())
    keys = Keys(settings.key_prefix)
    try:
        for tid in tids:
            while True:
                rid = await redis.get(keys.thread_active(tid))
                if rid and await redis.xlen(keys.run_events(rid.decode())) >= events_in:
                    break
                await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_worker_killed_9_mid_runs_readers_get_every_run_whole(
    settings: Settings, tmp_path: Path
) -> None:
    api = Tokenrelay(settings, with_worker=False).start()
    first = WorkerProcess(settings, tmp_path / "w0.log").start()
    second: WorkerProcess | None = None
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as c:
            tids = [await new_thread(c) for _ in range(4)]
            tasks = readers([api.url], tids, worker_body("twostep"), drop_after=15)
            # every run is streaming on the first worker, its first events in Redis: kill it
            await streaming(settings, tids)
            first.signal(signal.SIGKILL)
            first.wait()
            second = WorkerProcess(settings, tmp_path / "w1.log").start()
            results = await asyncio.gather(*tasks)
            for tid, rid, got, _ in results:
                reference = await join(c, tid, rid, "-1")
                assert frames(got) == frames(reference)
                assert [e.json()["attempt"] for e in got if e.event == "metadata"] == [1, 2]
                assert words(got, attempt=2).count(" ") + 1 == 100
                await wait_status(c, tid, rid, "success")
    finally:
        first.stop()
        if second is not None:
            second.stop()
        api.stop()


async def test_api_killed_9_clients_resume_on_another_replica(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    s = make_settings(redis_server)
    survivor = Tokenrelay(s).start()  # an API replica and the worker
    doomed = WorkerProcess(s, tmp_path / "api.log", command="api").start()
    try:
        async with httpx.AsyncClient(base_url=survivor.url, timeout=60) as c:
            tids = [await new_thread(c) for _ in range(6)]
        tasks = readers([doomed.url, survivor.url], tids, run_body("twostep"), drop_after=30)
        while "POST /threads" not in doomed.log_path.read_text():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        doomed.signal(signal.SIGKILL)  # no shutdown: its connections just break
        doomed.wait()
        results = await asyncio.gather(*tasks)
        async with httpx.AsyncClient(base_url=survivor.url, timeout=60) as c:
            for tid, rid, got, _ in results:
                reference = await join(c, tid, rid, "-1")
                assert frames(got) == frames(reference)
                assert reference[-1].event == "values"
    finally:
        doomed.stop()
        survivor.stop()


@pytest.fixture
def aof_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        port=free_port(), extra_args=["--appendonly", "yes", "--appendfsync", "always"]
    ).start()
    yield server
    server.close()


async def test_redis_restarted_with_aof_runs_go_on(aof_redis: EmbeddedRedis) -> None:
    s = make_settings(aof_redis)
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tids = [await new_thread(c) for _ in range(3)]
            tasks = readers([server.url], tids, run_body("twostep"), drop_after=40)
            while (await c.get(f"/threads/{tids[-1]}")).json()["status"] != "busy":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            aof_redis.kill()  # kill -9: what was fsynced to the AOF survives
            aof_redis.start()
            results = await asyncio.gather(*tasks)
            for tid, rid, got, _ in results:
                reference = await join(c, tid, rid, "-1")
                assert frames(got) == frames(reference)
                await wait_status(c, tid, rid, "success")
    finally:
        server.stop()


async def paused(redis: EmbeddedRedis, seconds: float) -> None:
    """Stop `redis` (SIGSTOP) for `seconds`: it keeps its connections open and answers nothing.
    It goes on however the wait ends."""
    assert redis.pid is not None
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(redis.pid, signal.SIGCONT)


async def test_redis_paused_past_the_socket_timeout_runs_go_on(own_redis: EmbeddedRedis) -> None:
    # SIGSTOP: Redis keeps its connections open and answers nothing. The pause outlasts the
    # socket timeout (5 s) and redis-py's own retries of a command, so the relay's retries
    # (appends, claims, the heartbeat) and its 503s carry the runs and readers through it
    # (seen in the logs). Commands sent before a timeout are still applied once Redis goes on,
    # after their senders gave up on them and sent them again. The worker's lease lapses too.
    s = make_settings(own_redis)
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tids = [await new_thread(c) for _ in range(3)]
            tasks = readers([server.url], tids, run_body("twostep"), drop_after=20)
            await streaming(s, tids)
            await paused(own_redis, 20)
            results = await asyncio.gather(*tasks)
            for tid, rid, got, _ in results:
                reference = await join(c, tid, rid, "-1")
                assert frames(got) == frames(reference)
                assert reference[-1].event == "values"
                # Nothing was written twice: the last attempt's reply is whole, once.
                last = [e.json()["attempt"] for e in reference if e.event == "metadata"][-1]
                reply = words(reference, attempt=last)
                assert reply.count(" ") + 1 == LONG_WORDS, reply
                await wait_status(c, tid, rid, "success")
    finally:
        server.stop()


async def test_redis_paused_past_the_lease_takes_no_run_from_a_live_worker(
    own_redis: EmbeddedRedis, postgres_url: str, tmp_path: Path
) -> None:
    # Jobs' idle times run on Redis's clock, which goes on while Redis is stopped: once it
    # answers, every run looks abandoned. The pause is shorter than the socket timeout, so no
    # command fails; the workers' renewals and claims all wait in line, and none may take a
    # run from the other (the lease clock holds takeovers for a lease after the stall).
    s = make_settings(own_redis, checkpointer=postgres_url, lease_seconds=1.5)
    server = Tokenrelay(s, with_worker=False).start()
    workers = [WorkerProcess(s, tmp_path / f"worker{i}.log").start() for i in range(2)]
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tids = [await new_thread(c) for _ in range(6)]
            tasks = readers([server.url], tids, worker_body("twostep"), drop_after=10_000)
            await streaming(s, tids)
            for _ in range(2):  # whether a worker's claim comes first after a pause is luck
                await paused(own_redis, 3)  # two leases
                await asyncio.sleep(1)
            for tid, rid, got, _ in await asyncio.gather(*tasks):
                assert [e.json()["attempt"] for e in got if e.event == "metadata"] == [1]
                assert words(got).count(" ") + 1 == LONG_WORDS
                await wait_status(c, tid, rid, "success")
        logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))
        assert "taking over run" not in logs
    finally:
        for w in workers:
            w.stop()
        server.stop()
