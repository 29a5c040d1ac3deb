"""The event log on a real Redis: append, read and tail, including lost live batches."""

from __future__ import annotations

import asyncio
import gc
import os
import types
from collections.abc import AsyncIterator, Callable

import pytest

from tests.conftest import RedisServer, make_settings
from tokenrelay.api.fanout import Fanout, Subscription
from tokenrelay.api.routes.stream import Prefetched
from tokenrelay.api.sse import format_event, format_history
from tokenrelay.broker import codec
from tokenrelay.broker.connection import connect
from tokenrelay.broker.errors import Superseded
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import BlobResolver, EventLog, History, LiveBatch
from tokenrelay.broker.models import END_EVENT, ZERO_ID, Entry, Event, Gap, RunStatus
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.producer.publisher import Publisher

pytestmark = pytest.mark.redis("standalone", "cluster")


@pytest.fixture
async def log(redis_server: RedisServer) -> AsyncIterator[tuple[EventLog, Fanout]]:
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    keys = Keys(s.key_prefix)
    fanout = Fanout(redis, keys, queue_limit=4)  # entries
    await fanout.start()
    elog = EventLog(redis, keys, maxlen=10_000, ttl_seconds=60)
    await elog.load_scripts()  # a test may queue a script call on a pipeline of its own
    yield elog, fanout
    await fanout.stop()
    await redis.aclose()


def ev(i: int) -> Event:
    return Event("custom", codec.json_bytes({"i": i}))


async def collect(it: AsyncIterator[Entry | None]) -> list[Entry]:
    return [e async for e in it if e is not None]


async def test_append_then_read_in_order(log: tuple[EventLog, Fanout]) -> None:
    elog, _ = log
    rid = new_id()
    await elog.append(rid, [ev(i) for i in range(5)])
    await elog.append(rid, [Event(END_EVENT, b"")], status=RunStatus.SUCCESS)
    entries = await elog.read(rid, ZERO_ID)
    assert [e.name for e in entries] == ["custom"] * 5 + [END_EVENT]
    assert [codec.json_loads(e.data)["i"] for e in entries[:5]] == list(range(5))
    assert await elog.read(rid, entries[2].id) == entries[3:]


async def test_tail_catches_up_then_goes_live(log: tuple[EventLog, Fanout]) -> None:
    elog, fanout = log
    rid = new_id()
    await elog.append(rid, [ev(i) for i in range(3)])

    async def produce() -> None:
        for i in range(3, 40):
            await elog.append(rid, [ev(i)])
            await asyncio.sleep(0.002)
        await elog.append(rid, [Event(END_EVENT, b"")])

    async with fanout.subscribe(rid) as live:
        task = asyncio.create_task(produce())
        got = await collect(elog.tail(rid, ZERO_ID, live, idle_seconds=1))
        await task
    assert [codec.json_loads(e.data)["i"] for e in got[:-1]] == list(range(40))
    assert got[-1].is_end


class LossyFeed:
    """A live feed that loses every other batch, as a dropped pub/sub message would."""

    def __init__(self, inner: Subscription) -> None:
        self.inner = inner
        self.n = 0

    @property
    def overflowed(self) -> bool:
        return self.inner.overflowed

    def reset(self) -> None:
        self.inner.reset()

    async def get(
        self, timeout: float, direct: Callable[[LiveBatch], bool] | None = None
    ) -> LiveBatch | None:
        # Offers no batch to `direct`: every batch passes here, to be lost or returned.
        while True:
            batch = await self.inner.get(timeout)
            self.n += 1
            if batch is None or self.n % 2:
                return batch


async def test_a_lost_live_batch_is_recovered_from_the_stream(
    log: tuple[EventLog, Fanout],
) -> None:
    elog, fanout = log
    rid = new_id()

    async def produce() -> None:
        await asyncio.sleep(0.05)
        for i in range(30):
            await elog.append(rid, [ev(2 * i), ev(2 * i + 1)])
            await asyncio.sleep(0.005)
        await elog.append(rid, [Event(END_EVENT, b"")])

    async with fanout.subscribe(rid) as live:
        task = asyncio.create_task(produce())
        # a long idle timeout: recovery must come from the batch's prev id, not from polling
        got = await collect(elog.tail(rid, ZERO_ID, LossyFeed(live), idle_seconds=30))
        await task
    assert [codec.json_loads(e.data)["i"] for e in got[:-1]] == list(range(60))


async def test_history_through_an_entry_reads_every_page_up_to_it_and_no_further(
    log: tuple[EventLog, Fanout],
) -> None:
    """What a joining WebSocket subscription is replayed: the run from its start through what
    the socket already sent, across pages."""
    elog, _ = log
    rid = new_id()
    await elog.append(rid, [ev(i) for i in range(1300)])
    entries = await elog.read(rid, ZERO_ID, count=2000)
    assert len(entries) == 1300
    for through in (entries[0], entries[511], entries[512], entries[1100], entries[-1]):
        got = [e async for page in elog.history(rid, through.id) for e in page]  # type: ignore[union-attr]
        assert got == entries[: entries.index(through) + 1]
    assert [page async for page in elog.history(rid, ZERO_ID)] == []


async def pages(it: AsyncIterator[History | list[Entry] | Gap | None]) -> list[Entry]:
    out: list[Entry] = []
    async for item in it:
        if isinstance(item, History):
            out += item.entries()
        elif isinstance(item, list):
            out += item
    return out


async def _prefetched(elog: EventLog, fanout: Fanout, rid: str, after: Entry) -> Prefetched:
    """A join's first page as the lookup reads it: the channel's epoch, then the page."""
    epoch = fanout.live_epoch(rid)
    assert epoch is not None, "the run is live in this process"
    pipe = elog._redis.pipeline(transaction=False)
    elog.page_in(pipe, rid, after.id)
    rows = elog.page_of(*await pipe.execute())
    assert rows is not None
    return Prefetched(rows, epoch)


async def test_a_page_read_before_joining_the_live_feed_is_trusted_only_if_nothing_was_missed(
    log: tuple[EventLog, Fanout],
) -> None:
    """A resume into a run live in the process reads its first page with its lookup, before
    it subscribes. A batch the process delivered in between is past that page: the reader
    then reads on from the stream, so it still gets every entry once."""
    elog, fanout = log
    rid = new_id()
    await elog.append(rid, [ev(i) for i in range(4)])
    entries = await elog.read(rid, ZERO_ID)
    async with fanout.subscribe(rid) as watcher:
        # Nothing between the page and the join: the page is complete, the rest comes live.
        first = await _prefetched(elog, fanout, rid, entries[1])
        async with fanout.subscribe(rid) as live:
            assert first.complete(entries[1].id, live.joined)
            tail = elog.tail_pages(rid, entries[1].id, live, idle_seconds=5, first=first.rows,
                                   first_complete=True)  # fmt: skip
            await elog.append(rid, [ev(4)])
            await elog.append(rid, [Event(END_EVENT, b"")])
            got = await pages(tail)
        assert [codec.json_loads(e.data)["i"] for e in got[:-1]] == [2, 3, 4]

        # A batch delivered between the page and the join: the page is not complete.
        rid = new_id()
        await elog.append(rid, [ev(i) for i in range(4)])
        entries = await elog.read(rid, ZERO_ID)
        async with fanout.subscribe(rid) as watcher:
            first = await _prefetched(elog, fanout, rid, entries[1])
            await elog.append(rid, [ev(4)])
            await elog.append(rid, [Event(END_EVENT, b"")])  # the run's last batch
            async with asyncio.timeout(5):  # the end batch was delivered to this process
                while not any(
                    e.is_end for e in (await watcher.get(5) or LiveBatch(None, [])).entries
                ):
                    pass
            async with fanout.subscribe(rid) as live:
                assert not first.complete(entries[1].id, live.joined)
                tail = elog.tail_pages(rid, entries[1].id, live, idle_seconds=30,
                                       first=first.rows)  # fmt: skip
                async with asyncio.timeout(5):  # not after an idle wait: no batch is coming
                    got = await pages(tail)
        assert [codec.json_loads(e.data)["i"] for e in got[:-1]] == [2, 3, 4]
        assert got[-1].is_end


async def test_slow_reader_overflows_to_catch_up_reads(log: tuple[EventLog, Fanout]) -> None:
    elog, fanout = log  # queue_limit=4 entries
    rid = new_id()
    async with fanout.subscribe(rid) as live:
        tail = elog.tail(rid, ZERO_ID, live, idle_seconds=5)
        await elog.append(rid, [ev(0)])
        first = await anext(tail)
        assert first is not None
        for i in range(1, 200):  # the reader is not reading: its queue overflows
            await elog.append(rid, [ev(i)])
        await elog.append(rid, [Event(END_EVENT, b"")])
        await asyncio.sleep(0.1)
        assert live.overflowed
        rest = await collect(tail)
    assert [codec.json_loads(e.data)["i"] for e in [first, *rest[:-1]]] == list(range(200))


async def test_metadata_blob_is_stored_once_and_spliced(log: tuple[EventLog, Fanout]) -> None:
    elog, fanout = log
    rid = new_id()
    meta = codec.json_bytes({"langgraph_node": "llm", "padding": "x" * 900})
    pipe = elog._redis.pipeline(transaction=False)
    rows = [("messages", codec.json_bytes({"content": f"w{i}"}), b"1.0") for i in range(50)]
    elog.append_in(pipe, rid, rows, blobs=[(b"1.0", meta)], seq=1)
    elog.append_in(pipe, rid, rows, blobs=[(b"1.0", meta)], seq=1)  # a retried batch: a no-op
    await pipe.execute()
    await elog.append(rid, [Event(END_EVENT, b"")])
    async with fanout.subscribe(rid) as live:
        got = await collect(elog.tail(rid, ZERO_ID, live, idle_seconds=1))
    assert len(got) == 51
    assert codec.json_loads(got[3].data) == [{"content": "w3"}, codec.json_loads(meta)]
    stream_bytes = await elog._redis.memory_usage(elog._keys.run_events(rid))
    assert stream_bytes is not None and stream_bytes < 50 * len(meta)


async def test_a_blob_passed_again_is_stored_as_an_equal_one_would_be(
    log: tuple[EventLog, Fanout],
) -> None:
    """The publisher recognises the blob object a run's last event carried (a message's
    chunks share one) without comparing its bytes: what it stores is what an equal blob
    would give, whatever the event's name and kind."""
    elog, _ = log
    publisher = Publisher(elog._redis, elog, flush_ms=60_000, max_events=10_000)
    rid = new_id()
    publisher.begin_run(rid, attempt=0)
    meta = codec.json_bytes({"langgraph_node": "llm", "padding": "x" * 300})
    same = bytes(bytearray(meta))  # an equal blob, another object
    assert same == meta and same is not meta
    sent = [
        Event("messages", b'"a"', blob=meta, content_only=True),
        Event("messages", b'"b"', blob=meta, content_only=True),  # the same object again
        Event("messages", b'{"content":"c"}', blob=meta),  # ... of another kind
        Event("messages|sub:1", b'{"content":"d"}', blob=meta),  # ... under another name
        Event("messages", b'"e"', blob=same, content_only=True),  # an equal one
        Event("messages", b'"f"', blob=meta, content_only=True),
    ]
    for event in sent:
        publisher.emit(rid, event)
    publisher.start()
    try:
        await publisher.close_run(rid, [Event(END_EVENT, b"")], RunStatus.SUCCESS)
    finally:
        await publisher.stop()
    got = await BlobResolver(elog, rid).resolve_all(await elog.read(rid, ZERO_ID))
    want = [
        (e.name, codec.splice_content(e.data, meta) if e.content_only
         else codec.splice_tuple(e.data, meta))
        for e in sent
    ]  # fmt: skip
    assert [(e.name, e.data) for e in got[:-1]] == want
    assert got[-1].is_end
    assert await elog._redis.hlen(elog._keys.run_blobs(rid)) == 2  # one per kind


async def test_a_burst_of_live_messages_arrives_whole_and_in_order(
    redis_server: RedisServer,
) -> None:
    """Messages Redis sends together are read from the buffer (BufferedPubSub), each exactly
    once, in order, with the subscribe confirmation before them."""
    from tokenrelay.broker import pubsub

    redis = connect(make_settings(redis_server).resolved_redis_url())
    sub = pubsub.subscriber(redis)
    channel = b"tr:test:{burst}"
    try:
        await sub.subscribe(channel)
        first = await sub.get_message(timeout=2.0)
        assert first is not None and first["type"] == "subscribe"
        payloads = [codec.pack([i, b"x" * i]) for i in range(60)]
        if isinstance(sub, pubsub.BufferedPubSub):  # one write, so Redis sends them together
            pipe = redis.pipeline(transaction=False)
            for payload in payloads:
                pipe.publish(channel, payload)
            await pipe.execute()
        else:
            for payload in payloads:
                await pubsub.publish(redis, channel, payload)
        got: list[bytes] = []
        while len(got) < len(payloads):
            msg = await sub.get_message(timeout=2.0)
            assert msg is not None
            assert (msg["type"], msg["channel"]) in (("message", channel), ("smessage", channel))
            got.append(msg["data"])
        assert got == payloads
        if isinstance(sub, pubsub.BufferedPubSub):
            assert sub.buffered_reads > 0
        await sub.unsubscribe(channel)
    finally:
        await sub.aclose()
        await redis.aclose()


def in_cycle(obj: object) -> bool:
    """Whether `obj` is reachable from what it refers to, through plain data (not through types,
    modules, functions or frames, which lead to everything)."""
    opaque = (type, types.ModuleType, types.FunctionType, types.FrameType, types.CoroutineType)
    seen: set[int] = set()
    todo = list(gc.get_referents(obj))
    while todo:
        o = todo.pop()
        if o is obj:
            return True
        if id(o) in seen or isinstance(o, opaque):
            continue
        seen.add(id(o))
        todo += gc.get_referents(o)
    return False


async def test_readers_of_a_run_in_one_process_share_each_live_batch(
    log: tuple[EventLog, Fanout],
) -> None:
    """A live batch that follows on is resolved once per process: every reader of the run gets
    the same entries (and so the same memo for the frames its protocol derives)."""
    from tokenrelay.broker.log import Batch

    elog, fanout = log
    rid = new_id()
    await elog.append(rid, [ev(0)])
    async with fanout.subscribe(rid) as a, fanout.subscribe(rid) as b:
        tails = [elog.tail_batches(rid, ZERO_ID, s, idle_seconds=5) for s in (a, b)]
        for tail in tails:
            page = await anext(tail)
            assert isinstance(page, list)
            assert [codec.json_loads(e.data)["i"] for e in page] == [0]
        await elog.append(rid, [ev(1), ev(2)])
        first, second = [await anext(tail) for tail in tails]
        assert isinstance(first, Batch) and first is second and first.memo is not None
        assert [codec.json_loads(e.data)["i"] for e in first] == [1, 2]
        # Freed by reference counting once its readers have it, not left to the cycle collector.
        assert not in_cycle(first)
        for tail in tails:
            await tail.aclose()  # type: ignore[attr-defined]


async def test_history_rendered_in_one_pass_frames_each_event_as_one_by_one(
    log: tuple[EventLog, Fanout],
) -> None:
    elog, _ = log
    rid = new_id()
    meta = codec.json_bytes({"langgraph_node": "llm"})
    rest = b'"type":"AIMessageChunk"},' + meta
    rows = [
        ("metadata", codec.json_bytes({"run_id": rid}), b""),
        ("messages", b'"He"', b"c1"),  # content only: [{"content":<data>,<blob>]
        ("messages|sub:1", codec.json_bytes({"content": "y"}), b"t1"),  # [<data>,<blob>]
        ("~x", b'"He"', b""),  # protocol only: never on the classic wire
        ("~Dd1", b'"He"', b""),  # a protocol text delta: its name names its blob
        ("messages", b'"llo"', b"c1"),
        ("messages", b'"!"', b"gone"),  # a blob no longer stored: an error in its place
        ("values", codec.json_bytes({"n": 1}), b""),
        (END_EVENT, b"", b""),
    ]
    await elog.load_scripts()
    pipe = elog._redis.pipeline(transaction=False)
    elog.append_in(
        pipe, rid, rows, blobs=[(b"c1", rest), (b"t1", meta), (b"Dd1", b"~m\x00llm\x00{")], seq=1
    )
    await pipe.execute()
    _, raw = await elog.page_rows(rid, ZERO_ID, check_gap=False)
    page = await BlobResolver(elog, rid).history(raw)
    assert page is not None and page.ends and page.last == (await elog.read(rid, ZERO_ID))[-1].id
    entries = page.entries()
    assert codec.json_loads(entries[1].data) == [
        {"content": "He", "type": "AIMessageChunk"},
        {"langgraph_node": "llm"},
    ]
    assert (entries[4].name, entries[4].node, entries[4].data) == ("~m", b"llm", b'{"He"}}')
    assert entries[6].name == "error" and b"MissingMetadata" in entries[6].data
    for names in (None, {"messages", "error", "metadata"}, {"values"}):
        one_by_one = [
            format_event(e)
            for e in entries
            if e.classic
            and (names is None or e.name.split("|", 1)[0] in names or e.name == "error")
        ]
        assert format_history(page, names) == (b"".join(one_by_one), len(one_by_one))


async def test_a_history_page_reads_each_entry_as_read_does_whatever_its_field_order(
    log: tuple[EventLog, Fanout],
) -> None:
    elog, _ = log
    rid = new_id()
    await elog.append(rid, [ev(0), ev(1)])
    key = Keys(elog._keys.prefix).run_events(rid)
    await elog._redis.xadd(key, {"m": b"c1", "d": b'"x"', "e": b"messages"})
    await elog._redis.xadd(key, {"d": b"{}", "e": b"values", "x": b"more"})
    await elog.append(rid, [ev(2)])
    expected = [
        (str(e.id).encode(), e.name.encode(), e.data, e.blob_ref or b"")
        for e in await elog.read(rid, ZERO_ID)
    ]
    assert len(expected) == 5
    for check_gap in (False, True):
        gap, rows = await elog.page_rows(rid, ZERO_ID, check_gap=check_gap)
        it = iter(rows)
        assert gap is None
        assert list(zip(it, it, it, it, strict=True)) == expected
    _, rows = await elog.page_rows(rid, (await elog.read(rid, ZERO_ID))[2].id, check_gap=True)
    assert rows[::4] == [row[0] for row in expected[3:]]


async def test_a_runs_end_sets_its_meta_fields_fenced_like_its_events(
    redis_server: RedisServer,
) -> None:
    """The end of a cancelled run records its fork checkpoint id in the same append; an attempt
    that was superseded writes neither."""
    s = make_settings(redis_server)
    redis = connect(s.resolved_redis_url())
    keys = Keys(s.key_prefix)
    runs = RunStore(redis, keys, ttl_seconds=60)
    publisher = Publisher(
        redis, EventLog(redis, keys, maxlen=100, ttl_seconds=60), flush_ms=5, max_events=100
    )
    publisher.start()
    try:
        kept, stale = new_id(), new_id()
        for run_id in (kept, stale):
            ts = now_ms()
            await runs.create(RunRecord(run_id, new_id(), "agent", RunStatus.PENDING, ts, ts))
            assert await runs.start_attempt(run_id, "w1", 3) == ("run", 1, 0)
            publisher.begin_run(run_id, attempt=1)
        assert await runs.start_attempt(stale, "w2", 3) == ("run", 2, 0)  # taken over
        end = [Event(END_EVENT, b"")]
        await publisher.close_run(kept, end, RunStatus.INTERRUPTED, {"checkpoint_id": "cp-1"})
        with pytest.raises(Superseded):
            await publisher.close_run(stale, end, RunStatus.INTERRUPTED, {"checkpoint_id": "cp-2"})
        ended = await runs.get(kept)
        assert (ended.status, ended.checkpoint_id) == (RunStatus.INTERRUPTED, "cp-1")
        running = await runs.get(stale)
        assert (running.status, running.checkpoint_id, running.attempt) == (
            RunStatus.RUNNING, "", 2,
        )  # fmt: skip
        assert await EventLog(redis, keys, maxlen=100, ttl_seconds=60).read(stale, ZERO_ID) == []
    finally:
        await publisher.stop()
        await redis.aclose()


async def test_one_append_call_keeps_each_payload_byte_for_byte_and_fences_each_run_apart(
    log: tuple[EventLog, Fanout],
) -> None:
    """A flush packs every run's part of its append call (msgpack): payloads and blobs come
    back byte for byte, whatever bytes they hold and however large, live and from history; a
    superseded attempt in the same flush writes nothing while the others write."""
    elog, fanout = log
    runs = RunStore(elog._redis, elog._keys, ttl_seconds=60)
    publisher = Publisher(elog._redis, elog, flush_ms=60_000, max_events=10_000)
    odd = bytes(range(256)) * 3  # every byte value: NULs, invalid UTF-8, msgpack type bytes
    large = os.urandom(6 << 20)
    kept, big, stale = new_id(), new_id(), new_id()
    for run_id in (kept, big, stale):
        ts = now_ms()
        await runs.create(RunRecord(run_id, new_id(), "agent", RunStatus.PENDING, ts, ts))
        assert await runs.start_attempt(run_id, "w1", 3) == ("run", 1, 0)
        publisher.begin_run(run_id, attempt=1)
    assert await runs.start_attempt(stale, "w2", 3) == ("run", 2, 0)  # taken over
    publisher.emit(kept, Event("custom", odd))
    publisher.emit(kept, Event("messages", b'"\\u0000"', blob=odd, content_only=True))
    publisher.emit(big, Event("values", large))
    publisher.emit(stale, Event("custom", odd))
    try:
        async with fanout.subscribe(kept) as live:
            waits = [asyncio.ensure_future(publisher.flush_run(r)) for r in (kept, big, stale)]
            await asyncio.sleep(0)  # every waiter is in before the one flush starts
            publisher.start()
            outcomes = await asyncio.gather(*waits, return_exceptions=True)
            batch = await live.get(5.0)
        assert outcomes[:2] == [None, None] and isinstance(outcomes[2], Superseded)
        assert publisher.flushes == 1
        assert batch is not None
        live_entries = await BlobResolver(elog, kept).resolve_all(batch.entries)
        stored = await BlobResolver(elog, kept).resolve_all(await elog.read(kept, ZERO_ID))
        spliced = codec.splice_content(b'"\\u0000"', odd)
        for entries in (live_entries, stored):
            assert [(e.name, e.data) for e in entries] == [("custom", odd), ("messages", spliced)]
        assert [e.data for e in await elog.read(big, ZERO_ID)] == [large]
        assert await elog.read(stale, ZERO_ID) == []
        record = await runs.get(stale)
        assert (record.seq, record.attempt, record.status) == (0, 2, RunStatus.RUNNING)
    finally:
        await publisher.stop()


async def test_batches_the_reader_takes_while_it_waits_and_those_it_is_woken_for_make_the_run_once(
    log: tuple[EventLog, Fanout],
) -> None:
    """A tail given `deliver` is offered each following batch while it waits: what it takes
    there and what it yields (batches refused, the end, catch-up after an overflow) are the run
    exactly once, in order."""
    from tokenrelay.broker.log import Batch

    elog, fanout = log  # queue_limit=4 entries
    rid = new_id()
    await elog.append(rid, [ev(0)])
    got: list[Entry] = []
    taken: list[Batch] = []
    offers = 0
    paused = False

    def deliver(batch: Batch) -> bool:
        nonlocal offers
        offers += 1
        assert not batch[-1].is_end  # the end always goes through the tail
        if offers % 3 == 0:
            return False  # refused, as a client the server cannot write to at once would be
        taken.append(batch)
        got.extend(batch)
        return True

    async def produce() -> None:
        for i in range(1, 120):
            await elog.append(rid, [ev(i)] if i % 2 else [ev(i), ev(1000 + i)])
            await asyncio.sleep(0.002)
        await elog.append(rid, [Event(END_EVENT, b"")])

    async with fanout.subscribe(rid) as live:
        task = asyncio.create_task(produce())
        tail = elog.tail_pages(rid, ZERO_ID, live, idle_seconds=5, deliver=deliver)
        async for item in tail:
            if isinstance(item, History):
                got.extend(item.entries())
            elif isinstance(item, list):
                got.extend(item)
            if not paused and len(got) > 80:
                await asyncio.sleep(0.3)  # the reader is away: its queue overflows
                paused = live.overflowed
                assert paused
        await task
    assert paused and taken and offers > len(taken)  # every path was taken
    assert got == await elog.read(rid, ZERO_ID, count=10_000)
    assert got[-1].is_end
