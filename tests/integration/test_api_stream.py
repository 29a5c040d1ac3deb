"""The stream API at scale and under failure: replicas, fan-out, slow clients, trimmed and
expired history, time budgets, long-poll, shutdown and Redis outages."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from tests.conftest import RedisServer, live_subscribers, make_settings
from tests.graphs import FLOOD_EVENTS
from tests.integration.test_stream import join, new_thread, run_body, stream_run
from tests.server import Tokenrelay, WorkerProcess
from tests.sse import SSE, events, iter_sse
from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedCluster, EmbeddedRedis
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import LiveBatch
from tokenrelay.broker.settings import Settings

pytestmark = [pytest.mark.timeout(240), pytest.mark.redis("standalone", "cluster")]


def metric(text: str, name: str = "tokenrelay_api_live_queued_entries") -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def gauge_reaches(
    c: httpx.AsyncClient, name: str, value: float, *, tries: int, every: float
) -> float:
    """Poll `/metrics` until the gauge `name` reads `value` (at most `tries` times, `every`
    seconds apart); returns its last reading."""
    for _ in range(tries):
        reading = metric((await c.get("/metrics")).text, name)
        if reading == value:
            break
        await asyncio.sleep(every)
    return reading


def same(a: list[SSE], b: list[SSE]) -> bool:
    return [(e.id, e.event, e.data) for e in a] == [(e.id, e.event, e.data) for e in b]


def differs(got: list[SSE], want: list[SSE]) -> str | None:
    """None when `got` is `want`, event for event; else where they part, to read in a failure."""
    a = [(e.id, e.event, e.data[:80]) for e in got]
    b = [(e.id, e.event, e.data[:80]) for e in want]
    if a == b:
        return None
    at = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return f"{len(a)} events against {len(b)}; from {at}: {a[at : at + 2]} / {b[at : at + 2]}"


@pytest.fixture(scope="module")
def settings(redis_server: RedisServer) -> Settings:
    return make_settings(redis_server)


@pytest.fixture(scope="module")
def relay(settings: Settings) -> Iterator[Tokenrelay]:
    server = Tokenrelay(settings).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc = WorkerProcess(
        settings, tmp_path_factory.mktemp("api") / "api.log", command="api"
    ).start()
    yield proc.url
    proc.stop()


async def test_resume_on_another_api_process(client: httpx.AsyncClient, second_api: str) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=10)
        async with httpx.AsyncClient(base_url=second_api, timeout=30) as other:
            run_id = head[0].json()["run_id"]
            rest = await join(other, tid, run_id, head[-1].id)
        reference = head + await events(r)
    assert same(head + rest, reference)


async def test_200_clients_on_one_run_share_one_subscription(
    client: httpx.AsyncClient, relay: Tokenrelay
) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=1)
        run_id = head[0].json()["run_id"]
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=relay.url, timeout=60, limits=limits) as many:
            readers = [asyncio.create_task(join(many, tid, run_id, "-1")) for _ in range(200)]
            redis = connect(relay.settings.resolved_redis_url())
            channel = Keys(relay.settings.key_prefix).live(run_id)
            await asyncio.sleep(0.5)
            subscribers = await live_subscribers(redis, channel)
            await redis.aclose()
            results = await asyncio.gather(*readers)
        reference = head + await events(r)
    assert subscribers == 1  # one API process: one subscription, whatever the client count
    assert [differs(got, reference) for got in results] == [None] * len(results)


async def test_readers_waiting_on_a_live_run_get_its_batches_written_from_the_fan_out(
    client: httpx.AsyncClient, relay: Tokenrelay, fanout_writes: dict[bool, int]
) -> None:
    """Readers of a run that wait for its next batch have it written to them by the fan-out
    (`SERVER_WRITE`), with no wake-up of their own; those joining, catching up or ending take
    theirs themselves. Every reader gets the run exactly, whichever way each batch went."""
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=3)
        run_id = head[0].json()["run_id"]
        readers = [asyncio.create_task(join(client, tid, run_id, "-1")) for _ in range(5)]
        resumed = [asyncio.create_task(join(client, tid, run_id, head[1].id)) for _ in range(5)]
        reference = head + await events(r)
        results = await asyncio.gather(*readers, *resumed)
    assert fanout_writes[True] > 50  # a token at a time, to 11 readers, for 60 tokens
    assert all(same(got, reference) for got in results[:5])
    assert all(same(got, reference[2:]) for got in results[5:])


async def test_a_closed_connection_is_freed_without_the_collector(relay: Tokenrelay) -> None:
    """Once its client hangs up, a connection and its requests (scope, cycle, transport) are
    freed as it closes, not left in reference cycles for the garbage collector: a process
    serving many reconnecting clients would pile them up and pause every stream to collect
    them. Each kind of request is tried: a plain one, a run streamed to its end, a resume read
    to the end and a live stream cut by its client."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept, to be seen
    try:
        before = weakref.WeakSet(relay.connections())
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as c:
            tid = await new_thread(c)
            assert (await c.get(f"/threads/{tid}")).status_code == 200
            head, _ = await stream_run(c, tid, run_body())
            run_id = head[0].json()["run_id"]
            assert await join(c, tid, run_id, head[1].id)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
                assert await events(r, limit=3)  # then hung up mid-stream
            assert (await c.get(f"/threads/{tid}/runs")).status_code == 200
            # Held weakly: a reference from here would keep them, and their cycles, alive.
            opened = weakref.WeakSet(p for p in relay.connections() if p not in before)
            assert len(opened) > 0
        for _ in range(200):
            gc.collect()  # moves anything left in a cycle to gc.garbage, where it stays
            if len(opened) == 0:
                break
            await asyncio.sleep(0.05)
        cycles = sum(isinstance(o, RequestResponseCycle) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(opened) == 0
    assert cycles == 0


@pytest.fixture
def unbounded_pubsub_output(redis_server: RedisServer) -> Iterator[None]:
    """Redis closes a pub/sub connection whose unread output passes its limit (32 MB by
    default), which a 50 MB flood can reach when the API falls behind on a loaded machine. The
    API's readers then catch up from the stream, which is right but is another fallback than a
    slow client's: lifted here so the test sees the one it is about."""
    import redis  # the blocking client: this runs between the test's awaits, briefly

    nodes = redis_server.nodes if isinstance(redis_server, EmbeddedCluster) else [redis_server]
    saved = []
    for node in nodes:
        with redis.Redis(port=node.port) as r:
            saved.append(r.config_get("client-output-buffer-limit")["client-output-buffer-limit"])
            r.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    try:
        yield
    finally:
        for node, limits in zip(nodes, saved, strict=True):
            with redis.Redis(port=node.port) as r:
                r.config_set("client-output-buffer-limit", limits)


async def test_slow_client_memory_stays_bounded_and_it_gets_everything(
    settings: Settings, tmp_path: Path, unbounded_pubsub_output: None
) -> None:
    api = WorkerProcess(settings, tmp_path / "api.log", command="api").start()
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        proc = psutil.Process(api.proc.pid)  # type: ignore[union-attr]
        # A small receive buffer: the kernel may otherwise grow a stalled connection's to 32 MB,
        # which holds most of the flood, and the API's live queue would rarely fill.
        small = httpx.AsyncHTTPTransport(
            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)]
        )
        async with httpx.AsyncClient(base_url=api.url, timeout=120, transport=small) as c:
            body = {"assistant_id": "flood", "input": {"messages": []}, "stream_mode": "custom"}
            # Warm-up: a client that reads along, so the allocator reaches its working size.
            tid = await new_thread(c)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
                assert len(await events(r)) == FLOOD_EVENTS + 1
            tid = await new_thread(c)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
                it = iter_sse(r)
                first = await anext(it)
                while not isinstance(first, SSE):
                    first = await anext(it)
                rss_before = proc.memory_info().rss
                run_id = first.json()["run_id"]
                # Stop reading while the run writes 50k events of 1 KB (50 MB).
                queued_max = 0.0
                for _ in range(600):
                    run = (await c.get(f"/threads/{tid}/runs/{run_id}")).json()
                    queued_max = max(queued_max, metric((await c.get("/metrics")).text))
                    if run["status"] == "success":
                        break
                    await asyncio.sleep(0.1)
                growth = proc.memory_info().rss - rss_before
                got = [item async for item in it if isinstance(item, SSE)]
            metrics = (await c.get("/metrics")).text
    finally:
        worker.stop()
        api.stop()
    assert [e.json()["i"] for e in got if e.event == "custom"] == list(range(FLOOD_EVENTS))
    # What the API holds for the stalled client is bounded by its live queue...
    assert queued_max <= 2048
    # ...and RSS, a coarse check (allocator churn alone moves it by tens of MB here), stays far
    # from what holding the 50 MB that flowed past the client, as Python objects, would take.
    assert growth < 100 * 2**20, f"API memory grew {growth / 2**20:.0f} MB for a stalled client"
    fallbacks = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("tokenrelay_api_slow_client_fallbacks_total")
    ]
    assert fallbacks and fallbacks[0] >= 1


@pytest.mark.redis("standalone")  # a pattern subscription, which sharded pub/sub lacks
async def test_a_flood_is_published_in_bounded_batches(
    client: httpx.AsyncClient, relay: Tokenrelay, unbounded_pubsub_output: None
) -> None:
    """However fast a graph writes, one append of a run, so one live batch (one pub/sub
    message for every reader of the run), carries at most `flush_max_events` of its events."""
    redis = connect(relay.settings.resolved_redis_url())
    pubsub = redis.pubsub()
    await pubsub.psubscribe(Keys(relay.settings.key_prefix).live("*"))
    sizes: list[int] = []

    async def listen() -> None:
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "pmessage":
                sizes.append(len(LiveBatch.decode(msg["data"]).entries))

    listening = asyncio.create_task(listen())
    try:
        tid = await new_thread(client)
        body = {"assistant_id": "flood", "input": {"messages": []}, "stream_mode": "custom"}
        async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
            got = await events(r)
        for _ in range(100):
            if sum(sizes) > FLOOD_EVENTS:
                break
            await asyncio.sleep(0.05)
    finally:
        listening.cancel()
        await pubsub.aclose()
        await redis.aclose()
    assert [e.json()["i"] for e in got if e.event == "custom"] == list(range(FLOOD_EVENTS))
    assert sum(sizes) > FLOOD_EVENTS  # the run's end is an entry too
    assert max(sizes) <= relay.settings.flush_max_events, max(sizes)


async def test_trimmed_history_gives_stream_gap_and_expired_run_410(
    redis_server: RedisServer,
) -> None:
    s = make_settings(redis_server, stream_maxlen=100, retention_seconds=2)
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = await new_thread(c)
            full, _ = await stream_run(c, tid, run_body("chatty"))
            run_id = full[0].json()["run_id"]
            resumed = await join(c, tid, run_id, full[0].id)
            assert resumed[0].event == "error"
            assert resumed[0].id is None
            gap = resumed[0].json()
            assert gap["error"] == "StreamGap"
            # then what is retained, in order, ending with the run's last event
            assert resumed[1].id in [e.id for e in full]
            assert [e.id for e in resumed[1:]] == [
                e.id for e in full[[e.id for e in full].index(resumed[1].id) :]
            ]
            # a reader that did not fall behind sees no gap
            assert all(e.event != "error" for e in await join(c, tid, run_id, full[-5].id))
            poll = (await c.get(f"/threads/{tid}/runs/{run_id}/events", params={
                "after": full[0].id})).json()  # fmt: skip
            assert poll["events"][0]["event"] == "error"
            assert poll["events"][0]["data"]["error"] == "StreamGap"

            await asyncio.sleep(3)  # past the retention time
            r = await c.get(f"/threads/{tid}/runs/{run_id}/stream", headers={"Last-Event-ID": "-1"})
            assert r.status_code == 410
            assert "expired" in r.json()["detail"]
            assert (await c.get(f"/threads/{tid}/runs/{run_id}")).status_code == 410
            assert (await c.get(f"/threads/{tid}/runs/{run_id}/events")).status_code == 410
    finally:
        server.stop()


async def read_into(r: httpx.Response, into: list[SSE]) -> bool:
    """Append events as they arrive; True when the response was aborted, not cleanly closed."""
    try:
        async for item in iter_sse(r):
            if isinstance(item, SSE):
                into.append(item)
    except httpx.RemoteProtocolError:
        return True
    return False


@pytest.mark.redis("standalone")  # HTTP time budget
async def test_max_seconds_chains_responses_into_the_exact_sequence(
    client: httpx.AsyncClient,
) -> None:
    tid = await new_thread(client)
    body = run_body("twostep")  # about 5 s of streaming
    chained: list[SSE] = []
    url = f"/threads/{tid}/runs/stream"
    async with client.stream("POST", url, params={"max_seconds": 1}, json=body) as r:
        location = r.headers["location"]
        aborted = int(await read_into(r, chained))
    run_id = location.split("/")[-2]
    reference_task = asyncio.create_task(join(client, tid, run_id, "-1"))
    while True:
        headers = {"Last-Event-ID": chained[-1].id or ""}
        async with client.stream("GET", location, params={"max_seconds": 1}, headers=headers) as r:
            if not await read_into(r, chained):
                break  # a clean close: the run is over
            aborted += 1  # cut at the budget: resume from the last id seen
    reference = await reference_task
    assert aborted >= 3
    assert same(chained, reference)
    assert reference[-1].event == "values"


async def test_long_poll_reassembles_the_sse_sequence(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=1)
        run_id = head[0].json()["run_id"]
        polled: list[dict[str, Any]] = []
        after, done, polls = "0", False, 0
        while not done:
            page = (
                await client.get(
                    f"/threads/{tid}/runs/{run_id}/events",
                    params={"after": after, "wait_ms": 2000, "limit": 7},
                )
            ).json()
            polled += page["events"]
            after, done, polls = page["next"], page["done"], polls + 1
        reference = head + await events(r)
    assert polls > 5
    assert [(p["id"], p["event"], p["data"]) for p in polled] == [
        (e.id, e.event, e.json()) for e in reference
    ]


@pytest.mark.redis("standalone")  # API shutdown
async def test_sigterm_aborts_live_streams_so_clients_resume_elsewhere(
    settings: Settings, relay: Tokenrelay, tmp_path: Path
) -> None:
    api = WorkerProcess(settings, tmp_path / "api.log", command="api").start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
            tid = await new_thread(c)
            async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
                head = await events(r, limit=5)
                api.signal(signal.SIGTERM)
                with pytest.raises(httpx.RemoteProtocolError):
                    await events(r)
        # uvicorn re-raises the signal once it has shut down, so it exits as SIGTERM'd
        assert api.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        api.stop()
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as other:
        run_id = head[0].json()["run_id"]
        rest = await join(other, tid, run_id, head[-1].id)
        reference = await join(other, tid, run_id, "-1")
    assert same(head + rest, reference)


async def test_redis_outage_gives_503_then_recovers_without_restart(
    own_redis: EmbeddedRedis,
) -> None:
    s = make_settings(own_redis)
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = await new_thread(c)
            own_redis.kill()
            r = await c.get(f"/threads/{tid}")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "Redis" in r.json()["detail"]
            assert (await c.get("/readyz")).status_code == 503
            assert (await c.get("/healthz")).status_code == 200
            own_redis.start()
            for _ in range(100):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            tid = await new_thread(c)  # the old data is gone with that Redis: a new thread
            evts, _ = await stream_run(c, tid, run_body())
            assert evts[-1].event == "values"
            assert evts[0].json()["attempt"] == 1
    finally:
        server.stop()


@pytest.mark.redis("standalone")  # HTTP only
async def test_cors_exposes_the_resume_headers(redis_server: RedisServer) -> None:
    s = make_settings(redis_server, cors_origins=["https://app.example"])
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = await new_thread(c)
            origin = {"Origin": "https://app.example"}
            pre = await c.options(
                f"/threads/{tid}/runs/stream",
                headers={**origin, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "content-type,last-event-id"},
            )  # fmt: skip
            assert pre.status_code == 200
            assert "last-event-id" in pre.headers["access-control-allow-headers"].lower()
            async with c.stream(
                "POST", f"/threads/{tid}/runs/stream", json=run_body(), headers=origin
            ) as r:
                await events(r)
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            exposed = r.headers["access-control-expose-headers"].lower()
            assert "location" in exposed
            assert "content-location" in exposed
    finally:
        server.stop()


@pytest.mark.redis("standalone")  # HTTP only
async def test_api_keys_guard_everything_but_probes(redis_server: RedisServer) -> None:
    s = make_settings(redis_server, api_keys=["k1", "k2"])
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            r = await c.post("/threads", json={})
            assert r.status_code == 401
            assert "API key" in r.json()["detail"]
            assert (
                await c.post("/threads", json={}, headers={"x-api-key": "nope"})
            ).status_code == 401
            assert (await c.get("/readyz")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200
            c.headers["x-api-key"] = "k2"
            tid = await new_thread(c)
            evts, _ = await stream_run(c, tid, run_body())
            assert evts[-1].event == "values"
    finally:
        server.stop()
