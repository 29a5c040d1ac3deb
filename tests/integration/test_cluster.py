"""What only a Redis Cluster tests: one slot per run and per thread, one flush appending to runs
on every node, sharded pub/sub that follows a migrated slot and a restarted node, readiness, and
the cluster URL forms. (The stream, resume and cancel suites also run on the cluster.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.cluster import key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from tests.conftest import make_settings
from tests.integration.test_stream import new_thread, run_body, stream_run
from tests.server import Tokenrelay
from tokenrelay.api.fanout import Fanout, Subscription
from tokenrelay.broker import codec, scripts
from tokenrelay.broker.connection import UNAVAILABLE, BoundedCluster, connect
from tokenrelay.broker.embedded import EmbeddedCluster, free_port
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import EventLog
from tokenrelay.broker.models import END_EVENT, ZERO_ID, Event, RunStatus
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.broker.settings import Settings
from tokenrelay.producer.publisher import Publisher

pytestmark = pytest.mark.timeout(120)


def run_keys(keys: Keys, run_id: str) -> list[str]:
    return [
        keys.run_events(run_id),
        keys.run_meta(run_id),
        keys.run_blobs(run_id),
        keys.run_cancel(run_id),
        keys.live(run_id),
    ]


def thread_keys(keys: Keys, thread_id: str) -> list[str]:
    return [
        keys.thread_meta(thread_id),
        keys.thread_active(thread_id),
        keys.thread_runs(thread_id),
        keys.thread_pending(thread_id),
    ]


def ev(i: int) -> Event:
    return Event("custom", codec.json_bytes({"i": i}))


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


@pytest.fixture
async def cluster_client(redis_cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    redis = connect(redis_cluster.url)
    assert isinstance(redis, RedisCluster)
    yield redis
    await redis.aclose()


@pytest.fixture
async def fanout(cluster_client: RedisCluster) -> AsyncIterator[tuple[EventLog, Fanout, Keys]]:
    keys = Keys(f"t{new_id()[:8]}")
    fan = Fanout(cluster_client, keys)
    await fan.start()
    yield EventLog(cluster_client, keys, maxlen=1000, ttl_seconds=60), fan, keys
    await fan.stop()


async def shard_subscribers(cluster: EmbeddedCluster, node: int, channel: str) -> int:
    """SSUBSCRIBE subscribers of `channel` on node `node`, asked of that node itself."""
    async with Redis(port=cluster.nodes[node].port) as redis:
        ((_, count),) = await redis.pubsub_shardnumsub(channel)
        return int(count)


async def until(check: Callable[[], object], what: str, tries: int = 200) -> None:
    for _ in range(tries):
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_keys_of_a_run_and_of_a_thread_each_share_one_slot() -> None:
    keys = Keys("tr")
    for _ in range(100):
        rid, tid = new_id(), new_id()
        assert len({slot_of(k) for k in run_keys(keys, rid)}) == 1
        assert len({slot_of(k) for k in thread_keys(keys, tid)}) == 1


async def test_scripts_touch_one_slot_and_a_cross_slot_call_is_refused(
    redis_cluster: EmbeddedCluster, cluster_client: RedisCluster
) -> None:
    keys = Keys(f"t{new_id()[:8]}")
    runs = RunStore(cluster_client, keys, ttl_seconds=60)
    log = EventLog(cluster_client, keys, maxlen=100, ttl_seconds=60)
    # Every script, through the stores, with the keys the broker gives it.
    tid, ts = new_id(), now_ms()
    run = RunRecord(new_id(), tid, "agent", RunStatus.PENDING, ts, ts)
    await runs.create(run)
    assert await runs.claim_thread(tid, run.run_id, enqueue=False, mark_busy=True) == (
        "started",
        "",
    )
    assert await runs.start_attempt(run.run_id, "w1", 3) == ("run", 1, 0)
    assert await log.append(run.run_id, [ev(0), Event(END_EVENT, b"")]) is None
    assert await runs.release_active(tid, run.run_id) is None
    assert [e.name for e in await log.read(run.run_id, ZERO_ID)] == ["custom", END_EVENT]

    # The append script sent straight to the node that owns the run: Redis itself accepts its
    # keys (and SPUBLISH from the script to the declared live channel)...
    append = scripts.script("append")
    rid = new_id()
    owner = redis_cluster.owner(slot_of(keys.run_events(rid)))
    run = ("", 0, 0, [], [("custom", b"{}", b"")], [])
    args = [100, 60, now_ms(), "SPUBLISH", codec.pack_script_args([run])]
    async with Redis(port=redis_cluster.nodes[owner].port) as node:
        await append.load(node)
        async with node.pubsub() as sub:
            await sub.ssubscribe(keys.live(rid))
            assert await append(node, run_keys(keys, rid), args) == [None]
            messages = [await sub.get_message(timeout=5.0) for _ in range(2)]
        assert [m["type"] for m in messages if m] == ["ssubscribe", "smessage"]
        # ...and refuses one whose live channel is another run's, as a cross-slot bug would.
        other = new_id()
        while slot_of(keys.live(other)) == slot_of(keys.run_events(rid)):
            other = new_id()
        bad = [*run_keys(keys, rid)[:4], keys.live(other)]
        with pytest.raises(ClusterCrossSlotError):  # the server's CROSSSLOT reply
            await append(node, bad, args)
    # The cluster client refuses it before sending.
    with pytest.raises(RedisClusterException):
        await append(cluster_client, bad, args)


async def test_one_flush_appends_to_runs_on_every_node(
    redis_cluster: EmbeddedCluster, cluster_client: RedisCluster
) -> None:
    keys = Keys(f"t{new_id()[:8]}")
    log = EventLog(cluster_client, keys, maxlen=100, ttl_seconds=60)
    by_node: dict[int, list[str]] = {i: [] for i in range(len(redis_cluster.nodes))}
    while any(len(runs) < 2 for runs in by_node.values()):
        rid = new_id()
        by_node[redis_cluster.owner(slot_of(keys.run_events(rid)))].append(rid)
    run_ids = [rid for runs in by_node.values() for rid in runs]
    cancelled = run_ids[3]
    await cluster_client.set(keys.run_cancel(cancelled), "interrupt", ex=60)
    signals: list[tuple[str, bytes]] = []
    publisher = Publisher(
        cluster_client,
        log,
        flush_ms=60_000,  # only the explicit flush below writes
        max_events=10_000,
        on_cancel=lambda rid, value: signals.append((rid, value)),
    )
    publisher.start()
    try:
        for rid in run_ids:
            await cluster_client.hset(keys.run_meta(rid), "attempt", 1)  # its current attempt
        for n, rid in enumerate(run_ids):
            publisher.begin_run(rid, attempt=1)
            for i in range(3):
                publisher.emit(rid, ev(n * 10 + i))
        await publisher.flush_all()
        assert publisher.flushes == 1  # one pipelined round, split by node under the hood
    finally:
        await publisher.stop()
    for n, rid in enumerate(run_ids):
        got = [codec.json_loads(e.data)["i"] for e in await log.read(rid, ZERO_ID)]
        assert got == [n * 10, n * 10 + 1, n * 10 + 2]
    assert signals == [(cancelled, b"interrupt")]


async def test_what_must_land_after_goes_in_a_round_trip_of_its_own(
    cluster_client: RedisCluster,
) -> None:
    """A cluster sends each node its share of a pipeline at once, so `in_sequence` sends the
    commands that must take effect after others only once those are answered."""
    keys = Keys(f"t{new_id()[:8]}")
    first_key, then_key = keys.run_meta(new_id()), keys.thread_runs(new_id())
    executed = 0
    make = cluster_client.pipeline

    def pipeline(*args: object, **kwargs: object) -> object:
        pipe = make(*args, **kwargs)  # type: ignore[arg-type]
        execute = pipe.execute

        async def counted(*args: object, **kwargs: object) -> object:
            nonlocal executed
            reply = await execute(*args, **kwargs)  # type: ignore[arg-type]
            executed += 1
            return reply

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    queued_after: list[int] = []

    def then(pipe: scripts.AnyPipeline) -> None:
        queued_after.append(executed)
        pipe.get(first_key)
        pipe.set(then_key, "2")

    cluster_client.pipeline = pipeline  # type: ignore[method-assign]
    try:
        replies = await scripts.in_sequence(
            cluster_client, lambda pipe: pipe.set(first_key, "1"), then
        )
    finally:
        del cluster_client.pipeline
    assert queued_after == [1] and executed == 2
    assert replies == ([True], [b"1", True])


async def test_live_subscription_follows_its_slot_to_another_node(
    redis_cluster: EmbeddedCluster, fanout: tuple[EventLog, Fanout, Keys]
) -> None:
    log, fan, keys = fanout
    rid = new_id()
    channel = keys.live(rid)
    slot = slot_of(channel)
    home = redis_cluster.owner(slot)
    away = (home + 1) % len(redis_cluster.nodes)

    async def delivered(live: Subscription, i: int) -> None:
        live.reset()  # as a tail does after its catch-up read
        await log.append(rid, [ev(i)])
        batch = await live.get(10.0)
        assert batch is not None, f"event {i} did not arrive live"
        assert [codec.json_loads(e.data)["i"] for e in batch.entries] == [i]

    async with fan.subscribe(rid) as live:
        assert await shard_subscribers(redis_cluster, home, channel) == 1
        await delivered(live, 0)
        for step, (src, dst) in enumerate([(home, away), (away, home)], start=1):
            await asyncio.to_thread(redis_cluster.move_slot, slot, dst)
            # The old owner drops the subscription; it is made again on the new one, and the
            # reader is told to catch up from the stream (which moved with the slot).
            await until(lambda: live.overflowed, "the reader was told to catch up")

            async def moved(src: int = src, dst: int = dst) -> bool:
                return (
                    await shard_subscribers(redis_cluster, dst, channel) == 1
                    and await shard_subscribers(redis_cluster, src, channel) == 0
                )

            await until(moved, f"the subscription moved to node {dst}")
            await delivered(live, step)
    assert [codec.json_loads(e.data)["i"] for e in await log.read(rid, ZERO_ID)] == [0, 1, 2]


@pytest.fixture
def own_cluster() -> Iterator[EmbeddedCluster]:
    cluster = EmbeddedCluster(masters=3).start()
    yield cluster
    cluster.close()


async def test_a_restarted_node_gives_503s_then_serves_and_live_feeds_resume(
    own_cluster: EmbeddedCluster,
) -> None:
    s = make_settings(own_cluster)
    keys = Keys(s.key_prefix)
    # The node that goes down serves neither the run queue nor this test's run.
    down = (own_cluster.owner(slot_of(keys.queue())) + 1) % 3
    tid = new_id()
    while own_cluster.owner(slot_of(keys.thread_meta(tid))) != down:
        tid = new_id()
    rid = new_id()
    while own_cluster.owner(slot_of(keys.live(rid))) != down:
        rid = new_id()
    channel = keys.live(rid)

    server = Tokenrelay(s).start()
    redis = connect(own_cluster.url)
    fan = Fanout(redis, keys)
    await fan.start()
    log = EventLog(redis, keys, maxlen=1000, ttl_seconds=60)
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as c,
            fan.subscribe(rid) as live,
        ):
            assert (await c.get("/readyz")).status_code == 200
            assert (await c.post("/threads", json={"thread_id": tid})).status_code == 200
            assert await shard_subscribers(own_cluster, down, channel) == 1

            own_cluster.nodes[down].kill()
            await until(lambda: live.overflowed, "the reader was told to catch up")
            ready = await c.get("/readyz")
            assert ready.status_code == 503
            assert ready.headers["retry-after"] == "1"
            r = await c.get(f"/threads/{tid}")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "Redis" in r.json()["detail"]
            r = await c.post("/threads", json={"thread_id": tid})
            assert r.status_code == 503

            # Back before the others declare it failed: same id, same slots, no data.
            own_cluster.nodes[down].start()
            await asyncio.to_thread(own_cluster.wait_ok)

            async def ready_again() -> bool:
                return (await c.get("/readyz")).status_code == 200

            await until(ready_again, "/readyz answered 200 again")

            async def resubscribed() -> bool:
                return await shard_subscribers(own_cluster, down, channel) == 1

            await until(resubscribed, "the live subscription was made again")
            live.reset()
            await log.append(rid, [ev(1)])
            batch = await live.get(10.0)
            assert batch is not None and len(batch.entries) == 1

            # The whole path works again, on the restarted node too.
            assert (await c.get(f"/threads/{tid}")).status_code == 404  # it kept no data
            assert (await c.post("/threads", json={"thread_id": tid})).status_code == 200
            evts, _ = await stream_run(c, tid, run_body())
            assert evts[0].json()["attempt"] == 1
            assert evts[-1].event == "values"
            assert (await c.get(f"/threads/{await new_thread(c)}")).status_code == 200
    finally:
        await fan.stop()
        await redis.aclose()
        server.stop()


async def test_cluster_urls_and_the_cluster_setting(
    redis_cluster: EmbeddedCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = [n.port for n in redis_cluster.nodes]
    tls = connect(f"rediss+cluster://me:secret@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/0")
    assert isinstance(tls, BoundedCluster)
    assert set(tls.nodes_manager.startup_nodes) == {f"127.0.0.1:{p}" for p in ports[:2]}
    assert tls.connection_kwargs["connection_class"] is SSLConnection
    assert (tls.connection_kwargs["username"], tls.connection_kwargs["password"]) == (
        "me",
        "secret",
    )
    await tls.aclose()  # never connected
    for bad in ("redis+cluster://", f"redis+cluster://127.0.0.1:{ports[0]},nowhere"):
        with pytest.raises(ValueError, match="host"):
            connect(bad)

    # No node answers: unavailable (503, retried), as with a single Redis that is down.
    nobody = connect(f"redis+cluster://127.0.0.1:{free_port()}")
    with pytest.raises(UNAVAILABLE):
        await nobody.get("k")
    await nobody.aclose()

    # A plain URL of any one node, with TOKENRELAY_REDIS_CLUSTER=1: the client finds the rest.
    monkeypatch.setenv("TOKENRELAY_REDIS_URL", redis_cluster.nodes[2].url)
    monkeypatch.setenv("TOKENRELAY_REDIS_CLUSTER", "1")
    settings = Settings()
    assert settings.redis_cluster
    redis = connect(settings.resolved_redis_url(), cluster=settings.redis_cluster)
    try:
        assert isinstance(redis, RedisCluster)
        keys = [f"k{i}" for i in range(30)]
        for k in keys:
            await redis.set(k, k, ex=60)
        assert {redis_cluster.owner(slot_of(k)) for k in keys} == {0, 1, 2}
        assert [await redis.get(k) for k in keys] == [k.encode() for k in keys]
    finally:
        await redis.aclose()
