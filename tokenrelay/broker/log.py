"""A run's event log: append a batch (one Lua call), read history, and tail it live.

Tailing subscribes to the run's live channel first, then reads history with XRANGE, then goes
live, dropping any live entry whose id is not greater than the last one delivered. Every live
batch names the id that preceded it, so a reader that missed a batch notices and catches up
from the stream instead of skipping events.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from redis.exceptions import NoScriptError

from tokenrelay.broker import codec, pubsub, scripts
from tokenrelay.broker.connection import RAW_REPLY, RedisClient
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import (
    END_EVENT,
    MESSAGES_EVENT,
    PROTOCOL_ONLY,
    ZERO_ID,
    Entry,
    Event,
    Gap,
    RunStatus,
    StreamId,
)
from tokenrelay.broker.scripts import AnyPipeline

PAGE_SIZE = 512
BLOB_CACHE_SIZE = 4096
"""Metadata blobs each process keeps (a few per run, about 1 KB each): a blob never changes once
written (HSETNX; an attempt names its blobs apart), so readers of a run fetch it once per
process, not once per connection."""

Row = tuple[str, bytes, bytes]
CONTENT_REF = b"c"
"""Blob refs of content-only entries start with this (see `Event.content_only`)."""
DELTA_REF = b"D"
"""Blob refs of protocol text deltas: the blob is ``<name>\\0<node>\\0<head>``, the entry the
text alone."""
NODE_REF = b"N"
"""Blob refs of other protocol `messages` entries: the blob is ``<name>\\0<node>``, the entry the
data."""
_BLOB_NAMED = PROTOCOL_ONLY.encode()
"""A protocol `messages` entry is stored as ``e`` = ``~<ref>`` and ``d`` alone: its name, node
and fixed head are in the blob, so each token costs Redis its text and a few bytes, and the
entries keep the two fields of the stream's other entries (Redis then stores no field names)."""
_NAMED_REFS = (_BLOB_NAMED + DELTA_REF, _BLOB_NAMED + NODE_REF)
FENCED = b"!fenced"
"""What an append returns when its attempt is no longer the run's current one."""
StreamRow = tuple[bytes, dict[bytes, bytes]]
RUNS_PER_CALL = 128
"""At most this many runs' appends in one script call (Redis runs a call to its end before
anything else: this bounds how long one call can hold it)."""


APPEND_KEYS_CACHED = 8192
"""Runs whose append keys an `EventLog` keeps encoded: more than a worker process runs at once
by default (`TOKENRELAY_WORKER_CONCURRENCY`)."""


@dataclass(slots=True)
class RunAppend:
    """One run's part of an append call (see `EventLog.append_runs_in`). Not frozen: a worker
    makes one per run per flush, and a frozen one takes several times as long to make."""

    run_id: str
    rows: Sequence[Row]
    blobs: Sequence[tuple[bytes, bytes]] = ()
    status: RunStatus | None = None
    seq: int = 0
    attempt: int = 0
    fields: Sequence[tuple[str, str]] = ()
    """Other meta fields set with the batch (the end's fork checkpoint id)."""


BlobFetch = asyncio.Future[dict[bytes, bytes] | None]
"""A blob fetch in flight: the blobs it found, or None if it did not finish."""


@dataclass(slots=True)
class LiveBatch:
    """One append batch as published on a run's live channel. Every reader of the run in an
    API process gets the same object; `memo` keeps what they derive from it alike. Never
    changed once decoded; not frozen, as `Entry` is not, for the time a frozen one takes to
    make."""

    prev: StreamId | None
    entries: list[Entry]
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def decode(cls, payload: bytes) -> LiveBatch:
        prev_raw, rows = codec.unpack_raw(payload)
        prev = StreamId.of_redis(prev_raw) if prev_raw else None
        return cls(prev, [_entry(r[0], r[1], r[2], r[3]) for r in rows])


class Batch(list[Entry]):
    """Entries a reader gets at once. Those of a live batch that follows on what the reader
    had are the same objects for every reader of the run in this process; then `memo` is shared
    by them, so what a protocol derives from them (its frames) is done once per process, not
    once per reader. It is a dict of its own, not the `LiveBatch.memo` that holds this batch:
    the two referring to each other made every live batch a reference cycle, which only the
    cycle collector freed (the API's cyclic garbage, all of it, under the bench's paced load)."""

    __slots__ = ("memo",)

    def __init__(self, entries: Iterable[Entry], memo: dict[str, Any] | None = None) -> None:
        super().__init__(entries)
        self.memo = memo


ROW_WIDTH = 4
"""A page of history comes as one flat list, four values per entry: id, event name, data and
blob ref (b"" for none), as `EventLog.page_rows` reads them."""


@dataclass(frozen=True, slots=True)
class History:
    """A page of catch-up history as Redis returned it, its blobs fetched: a reader renders it
    in one pass (see ``tokenrelay/api/sse.py``), with no object per entry, or asks for its
    entries. `last` is its newest id; `ends` whether it closes with the run's `end`."""

    rows: list[bytes]
    """`ROW_WIDTH` values per entry."""
    blobs: dict[bytes, bytes]
    last: StreamId
    ends: bool

    def entries(self) -> list[Entry]:
        it = iter(self.rows)
        return [self.entry(*row) for row in zip(it, it, it, it, strict=True)]

    def entry(self, id_: bytes, name: bytes, data: bytes, ref: bytes) -> Entry:
        """The entry of one row, its blob spliced in."""
        return spliced(_entry(id_, name, data, ref), self.blobs)

    def splice_parts(self, ref: bytes) -> tuple[bytes, bytes] | None:
        """What goes before and after the data of a classic entry whose blob is `ref`, or None
        when that blob is no longer stored (`entry` then gives the error in its place)."""
        blob = self.blobs.get(ref)
        if blob is None or ref.startswith((DELTA_REF, NODE_REF)):
            return None
        if ref.startswith(CONTENT_REF):
            return b"[" + codec.CONTENT_HEAD, b"," + blob + b"]"
        return b"[", b"," + blob + b"]"


class LiveSubscription(Protocol):
    """What a tail needs from a live feed of one run (see ``tokenrelay/api/fanout.py``)."""

    @property
    def overflowed(self) -> bool: ...

    def reset(self) -> None:
        """Drop queued batches and clear the overflow flag before a catch-up read."""

    async def get(
        self, timeout: float, direct: Callable[[LiveBatch], bool] | None = None
    ) -> LiveBatch | None:
        """The next batch, or None after `timeout` seconds without one. While it waits with
        nothing queued, a batch is first offered to `direct`, which takes it (True) or leaves
        it to be returned (False, having done nothing); a batch taken is not returned, and
        counts as activity for the timeout."""


def _entry(id_: bytes, name: bytes, data: bytes, blob_ref: bytes | None) -> Entry:
    if name[:2] in _NAMED_REFS:
        return Entry(StreamId.of_redis(id_), MESSAGES_EVENT, data, name[1:])
    return Entry(StreamId.of_redis(id_), name.decode(), data, blob_ref or None)


class EventLog:
    """Append, read and tail the event streams of runs."""

    def __init__(self, redis: RedisClient, keys: Keys, *, maxlen: int, ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._maxlen = maxlen
        self._ttl = ttl_seconds
        self._append = scripts.script("append")
        self._publish = pubsub.publish_command(redis)
        self._blobs: dict[tuple[str, bytes], bytes] = {}
        self._fetching: dict[tuple[str, bytes], BlobFetch] = {}
        # A worker appends for the same runs flush after flush: their keys are built and
        # encoded once, not five strings per run per flush for the Redis client to encode.
        self._append_keys = functools.lru_cache(maxsize=APPEND_KEYS_CACHED)(self._encoded_keys)

    @property
    def runs_per_call(self) -> int:
        """How many runs' appends one script call may carry: one on a cluster, where a call's
        keys must share a hash slot."""
        return 1 if self._publish == "SPUBLISH" else RUNS_PER_CALL

    def append_in(
        self,
        pipe: AnyPipeline,
        run_id: str,
        rows: Sequence[Row],
        *,
        blobs: Sequence[tuple[bytes, bytes]] = (),
        status: RunStatus | None = None,
        seq: int = 0,
        attempt: int = 0,
    ) -> None:
        """Queue one append of `rows` on `pipe`; its result is a list of one item: the run's
        cancel request or None (see `append_runs_in`)."""
        self.append_runs_in(pipe, [RunAppend(run_id, rows, blobs, status, seq, attempt)])

    def append_runs_in(self, pipe: AnyPipeline, appends: Sequence[RunAppend]) -> None:
        """Queue one script call appending each of `appends` (at most `runs_per_call`); its
        result lists, for each, the run's cancel request or None, or ``FENCED``.

        A row is (event name, JSON data, blob ref or b""); `blobs` are the (ref, blob) pairs
        first referenced in this batch. A positive `seq` (increasing per run) makes a retried
        batch a no-op once it was applied; a positive `attempt` fences off a superseded worker.
        """
        keys: list[bytes] = []
        runs: list[tuple[Any, ...]] = []
        for a in appends:
            keys += self._append_keys(a.run_id)
            # The rows go as they are: msgpack packs them in C, not an argument at a time.
            status = a.status.value if a.status else ""
            runs.append((status, a.seq, a.attempt, a.blobs, a.rows, a.fields))
        args = [
            self._maxlen,
            self._ttl,
            int(time.time() * 1000),
            self._publish,
            codec.pack_script_args(runs),
        ]
        self._append.queue(pipe, keys, args)

    def _encoded_keys(self, run_id: str) -> tuple[bytes, ...]:
        """The keys of `run_id`'s part of an append call, in the script's order."""
        k = self._keys
        return (
            k.run_events(run_id).encode(),
            k.run_blobs(run_id).encode(),
            k.run_meta(run_id).encode(),
            k.run_cancel(run_id).encode(),
            k.live(run_id).encode(),
        )

    async def append(
        self, run_id: str, events: Sequence[Event], *, status: RunStatus | None = None
    ) -> bytes | None:
        """Append `events` (blobs inlined) in one round trip; returns the run's cancel request."""
        rows = [(e.name, _inline(e), b"") for e in events]
        pipe = self._redis.pipeline(transaction=False)
        self.append_in(pipe, run_id, rows, status=status)
        (result,) = await pipe.execute(raise_on_error=False)
        if isinstance(result, NoScriptError):
            await self._append.load(self._redis)
            return await self.append(run_id, events, status=status)
        if isinstance(result, Exception):
            raise result
        return result[0]  # type: ignore[no-any-return]

    async def end_unclaimed(
        self, run_id: str, events: Sequence[Event], status: RunStatus, *, attempt: int = -1
    ) -> bool:
        """Append `events` with the final `status` only if no worker has started the run yet
        (a cancel of a run still waiting in the queue), or, with a positive `attempt`, only if
        that is still the run's current attempt (a run whose worker is gone for good); returns
        whether it did."""
        rows = [(e.name, _inline(e), b"") for e in events]
        pipe = self._redis.pipeline(transaction=False)
        self.append_in(pipe, run_id, rows, status=status, attempt=attempt)
        (result,) = await pipe.execute(raise_on_error=False)
        if isinstance(result, NoScriptError):
            await self._append.load(self._redis)
            return await self.end_unclaimed(run_id, events, status, attempt=attempt)
        if isinstance(result, Exception):
            raise result
        return bool(result[0] != FENCED)

    async def load_scripts(self) -> None:
        await self._append.load(self._redis)

    async def read(self, run_id: str, after: StreamId, count: int = PAGE_SIZE) -> list[Entry]:
        """Up to `count` entries with ids greater than `after`, oldest first."""
        rows = cast(
            list[StreamRow],
            await self._redis.xrange(
                self._keys.run_events(run_id), min=f"({after}", max="+", count=count
            ),
        )
        return _entries(rows)

    async def page(
        self, run_id: str, after: StreamId, *, check_gap: bool, count: int = PAGE_SIZE
    ) -> tuple[Gap | None, list[Entry]]:
        """`read`, and with `check_gap` `gap_after` first, in one round trip (one script: its
        flat reply costs the client far less to parse than XRANGE's)."""
        gap, rows = await self.page_rows(run_id, after, check_gap=check_gap, count=count)
        it = iter(rows)
        return gap, [_entry(*row) for row in zip(it, it, it, it, strict=True)]

    async def page_rows(
        self, run_id: str, after: StreamId, *, check_gap: bool, count: int = PAGE_SIZE
    ) -> tuple[Gap | None, list[bytes]]:
        """`page`, its entries flat (`ROW_WIDTH` values each), as few objects as it takes: the
        XRANGE reply is read raw (redis-py's tuples of dicts, or a script re-building the
        reply, each cost a full replay more than Redis's read)."""
        events = self._keys.run_events(run_id)
        page = self._page_command(run_id, after, count)
        if not check_gap:
            return None, _flat(await self._redis.execute_command(*page, **{RAW_REPLY: True}))
        # The trimming check and the page in one transaction: the first entry still retained
        # is the one the page would start after, were any trimmed away before it was read.
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._keys.run_meta(run_id), "trimmed")
        pipe.xrange(events, count=1)
        pipe.execute_command(*page, **{RAW_REPLY: True})
        trimmed, first, rows = await pipe.execute()
        return _gap(after, trimmed, first), _flat(rows)

    def page_in(self, pipe: AnyPipeline, run_id: str, after: StreamId) -> None:
        """Queue a page after `after` on `pipe` (no transaction needed), then the meta's
        trimming flag; `page_of` reads the two replies."""
        pipe.execute_command(*self._page_command(run_id, after, PAGE_SIZE), **{RAW_REPLY: True})
        pipe.hget(self._keys.run_meta(run_id), "trimmed")

    def _page_command(self, run_id: str, after: StreamId, count: int) -> tuple[Any, ...]:
        """The XRANGE of a page: up to `count` entries after `after` (read with `RAW_REPLY`)."""
        return ("XRANGE", self._keys.run_events(run_id), f"({after}", "+", "COUNT", count)

    @staticmethod
    def page_of(rows: list[list[Any]], trimmed: bytes | None) -> list[bytes] | None:
        """The rows of a page queued by `page_in`, or None when the stream was ever trimmed.
        The flag is read after the page: unset then, nothing was trimmed before the page was
        read, so no entry after the cursor is missing from it. Set, the page must be read
        again with its trimming check (`page_rows`)."""
        return None if trimmed else _flat(rows)

    async def last_entry(self, run_id: str) -> Entry | None:
        """The newest entry, or None for an empty or missing stream."""
        rows = await self._redis.xrevrange(self._keys.run_events(run_id), count=1)
        return last_of(cast(list[StreamRow], rows))

    def last_entry_in(self, pipe: AnyPipeline, run_id: str) -> None:
        """Queue `last_entry` on `pipe`; `last_of` reads its reply."""
        pipe.xrevrange(self._keys.run_events(run_id), count=1)

    async def last_event(self, run_id: str) -> Entry | None:
        """The newest entry the classic protocols send (not `end`, not protocol-only)."""
        key = self._keys.run_events(run_id)
        rows = cast(list[StreamRow], await self._redis.xrevrange(key, count=8))
        for id_, f in rows:
            entry = _entry(id_, f[b"e"], f[b"d"], f.get(b"m"))
            if entry.classic:
                return entry
        return None

    async def has_after(self, run_id: str, after: StreamId) -> bool:
        """Whether any entry newer than `after` exists."""
        return bool(await self.read(run_id, after, count=1))

    async def gap_after(self, run_id: str, after: StreamId) -> Gap | None:
        """A Gap if entries newer than `after` were trimmed away (MAXLEN) before being read."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._keys.run_meta(run_id), "trimmed")
        pipe.xrange(self._keys.run_events(run_id), count=1)
        trimmed, first = await pipe.execute()
        return _gap(after, trimmed, first)

    async def blobs(self, run_id: str, refs: Sequence[bytes]) -> dict[bytes, bytes]:
        """The stored blobs among `refs`, from this process's cache, else in one HMGET. Readers
        that ask for a blob already being fetched (a storm of joins to one run) wait for that
        fetch instead of sending their own."""
        found: dict[bytes, bytes] = {}
        missing: list[bytes] = []
        waits: list[BlobFetch] = []
        for ref in refs:
            key = (run_id, ref)
            blob = self._blobs.get(key)
            if blob is not None:
                found[ref] = blob
            elif key in self._fetching:
                waits.append(self._fetching[key])
            else:
                missing.append(ref)
        if missing:
            found.update(await self._fetch_blobs(run_id, missing))
        for fetch in waits:
            got = await asyncio.shield(fetch)
            if got is None:  # that fetch failed or its reader left: fetch it here
                return {**found, **await self._fetch_blobs(run_id, refs)}
            found.update((ref, blob) for ref, blob in got.items() if ref in refs)
        return found

    async def _fetch_blobs(self, run_id: str, refs: Sequence[bytes]) -> dict[bytes, bytes]:
        fetch: BlobFetch = asyncio.get_running_loop().create_future()
        keys = [(run_id, ref) for ref in refs]
        for key in keys:
            self._fetching.setdefault(key, fetch)
        got: dict[bytes, bytes] | None = None
        try:
            values = await self._redis.hmget(self._keys.run_blobs(run_id), list(refs))  # type: ignore[misc]
            got = {}
            for ref, blob in zip(refs, cast(list[bytes | None], values), strict=True):
                if blob is not None:
                    got[ref] = blob
                    self._remember(run_id, ref, blob)
            return got
        finally:
            # However this ends (cancelled with its reader, Redis away), the waiters wake.
            for key in keys:
                if self._fetching.get(key) is fetch:
                    del self._fetching[key]
            fetch.set_result(got)

    def _remember(self, run_id: str, ref: bytes, blob: bytes) -> None:
        if len(self._blobs) >= BLOB_CACHE_SIZE:
            del self._blobs[next(iter(self._blobs))]  # the oldest
        self._blobs[(run_id, ref)] = blob

    async def history(self, run_id: str, through: StreamId) -> AsyncIterator[list[Entry] | Gap]:
        """The entries from the run's start through `through`, a page at a time, with a Gap
        first if MAXLEN trimmed its start away: what a reader already past `through` in a tail
        replays for one that joins it."""
        blobs = BlobResolver(self, run_id)
        after = ZERO_ID
        check_gap = True
        while after < through:
            gap, rows = await self.page_rows(run_id, after, check_gap=check_gap)
            check_gap = False
            if gap is not None:
                yield gap
            page = await blobs.history(rows)
            if page is None:
                return
            entries = [e for e in page.entries() if e.id <= through]
            if entries:
                yield entries
            if page.ends or len(rows) < PAGE_SIZE * ROW_WIDTH:
                return
            after = page.last

    async def tail(
        self,
        run_id: str,
        after: StreamId,
        live: LiveSubscription,
        *,
        idle_seconds: float,
    ) -> AsyncIterator[Entry | Gap | None]:
        """Every entry after `after` in order, then live ones, up to and including `end`.

        Yields None each time `idle_seconds` pass without an entry (for heartbeats), and a Gap
        where trimmed history makes delivery skip ahead: never silently. The caller must have
        subscribed `live` before calling, so nothing falls between history and live.
        """
        async for item in self.tail_batches(run_id, after, live, idle_seconds=idle_seconds):
            if isinstance(item, list):
                for entry in item:
                    yield entry
            else:
                yield item

    async def tail_batches(
        self,
        run_id: str,
        after: StreamId,
        live: LiveSubscription,
        *,
        idle_seconds: float,
        deliver: Callable[[Batch], bool] | None = None,
    ) -> AsyncIterator[list[Entry] | Gap | None]:
        """`tail`, a history page or a live batch at a time, so a reader writes each batch
        to its client at once. A batch is never empty; `end`, if present, is its last entry.
        `deliver` as `tail_pages` takes it."""
        tail = self.tail_pages(run_id, after, live, idle_seconds=idle_seconds, deliver=deliver)
        async for item in tail:
            yield item.entries() if isinstance(item, History) else item

    async def tail_pages(
        self,
        run_id: str,
        after: StreamId,
        live: LiveSubscription,
        *,
        idle_seconds: float,
        first: list[bytes] | None = None,
        first_complete: bool = False,
        deliver: Callable[[Batch], bool] | None = None,
    ) -> AsyncIterator[History | list[Entry] | Gap | None]:
        """`tail_batches`, each page of history as a `History`, which a reader can render
        without building its entries (a full replay is thousands of them).

        `first` is the page after `after` (`page_of`), read before `live` was subscribed; with
        `first_complete` nothing made after it was missed by `live` (it goes live next, as
        after a page read here), else reading goes on after it.

        `deliver`, when given, is offered each live batch that follows on what the tail gave
        while it waits for one (with no `end`, its blobs known): the reader sends it there and
        then (True), from the fan-out's turn, instead of being woken for it; that batch is then
        not yielded, and the tail goes on after it. False leaves it to the tail, as any other."""
        last = after
        blobs = BlobResolver(self, run_id)
        check_gap = True

        def direct(batch: LiveBatch) -> bool:
            nonlocal last
            if deliver is None or batch.prev is None or batch.prev != last:
                return False
            if _RESOLVED not in batch.memo and not blobs.cached(batch.entries):
                return False  # a blob to fetch first: the tail does it
            shared = _shared_entries(batch, blobs)
            if not shared or shared[-1].is_end or not deliver(shared):
                return False
            last = shared[-1].id
            return True

        offer = direct if deliver is not None else None
        while True:
            # Catch up from the stream. What `live` queued since `first` was read is kept.
            if first is None:
                live.reset()
            ahead: asyncio.Future[tuple[Gap | None, list[bytes]]] | None = None
            try:
                while True:
                    more = False
                    if first is not None:
                        gap, rows, first = None, first, None
                        more = not first_complete
                    elif ahead is None:
                        gap, rows = await self.page_rows(run_id, last, check_gap=check_gap)
                    else:
                        gap, rows = await ahead
                        ahead = None
                    if gap is not None:
                        yield gap
                    full = more or len(rows) == PAGE_SIZE * ROW_WIDTH
                    page = await blobs.history(rows)
                    if page is None:
                        if more:
                            continue
                        break
                    if full and not page.ends:
                        # A long catch-up: the next page is read while this one goes out (and
                        # checks for trimming, which a long read can fall behind).
                        after_page = self.page_rows(run_id, page.last, check_gap=True)
                        ahead = asyncio.ensure_future(after_page)
                    last = page.last
                    yield page
                    if page.ends:
                        return
                    if not full:
                        break
            finally:
                if ahead is not None:
                    ahead.cancel()
            check_gap = False
            # Live until the feed overflows, misses a batch or goes quiet.
            while True:
                if live.overflowed:
                    check_gap = True  # a slow reader may have fallen behind the trimmed history
                    break
                batch = await live.get(idle_seconds, offer)
                if batch is None:
                    yield None
                    break  # re-read the stream: cheap, and covers a lost pub/sub message
                if batch.prev is not None and batch.prev > last:
                    break  # a batch was missed: catch up from the stream
                out: list[Entry]
                if batch.prev is not None and batch.prev == last:
                    # It follows on (the usual case): all of it is new, resolved once for
                    # every reader of the run in this process.
                    if _RESOLVED not in batch.memo:
                        await blobs.fetch(batch.entries)
                    out = _shared_entries(batch, blobs)
                else:
                    fresh = [e for e in batch.entries if e.id > last]
                    out = await blobs.resolve_all(_through_end(fresh))
                if out:
                    last = out[-1].id
                    yield out
                    if out[-1].is_end:
                        return


_RESOLVED = "entries"
"""`LiveBatch.memo` key of the batch's entries with their blobs spliced in."""


def _shared_entries(batch: LiveBatch, blobs: BlobResolver) -> Batch:
    """`batch`'s entries through its `end`, their blobs (cached in `blobs`) spliced in: made
    once per process, and the same object for every reader of the run here."""
    shared: Batch | None = batch.memo.get(_RESOLVED)
    if shared is None:
        shared = batch.memo[_RESOLVED] = Batch(blobs.splice_all(_through_end(batch.entries)), {})
    return shared


def _entries(rows: list[StreamRow]) -> list[Entry]:
    return [_entry(id_, f[b"e"], f[b"d"], f.get(b"m")) for id_, f in rows]


def last_of(rows: list[StreamRow]) -> Entry | None:
    """The entry of an XREVRANGE ... COUNT 1 reply (see `EventLog.last_entry_in`)."""
    if not rows:
        return None
    id_, f = rows[0]
    return _entry(id_, f[b"e"], f[b"d"], f.get(b"m"))


def _flat(rows: list[list[Any]]) -> list[bytes]:
    """A raw XRANGE reply as `ROW_WIDTH` values per entry. The append script writes each
    entry's fields in one order (`e`, `d`, then `m` when it names a blob)."""
    out: list[bytes] = []
    for id_, f in rows:
        n = len(f)
        if n == 4 and f[0] == b"e" and f[2] == b"d":
            out += (id_, f[1], f[3], b"")
        elif n == 6 and f[0] == b"e" and f[2] == b"d" and f[4] == b"m":
            out += (id_, f[1], f[3], f[5])
        else:
            fields = dict(zip(f[::2], f[1::2], strict=True))
            out += (id_, fields.get(b"e", b""), fields.get(b"d", b""), fields.get(b"m", b""))
    return out


def _gap(after: StreamId, trimmed: bytes | None, first: list[StreamRow]) -> Gap | None:
    """The Gap before `after`, given the meta's `trimmed` flag and the stream's first entry."""
    if not trimmed or not first:
        return None
    first_id = StreamId.parse(first[0][0])
    return Gap(after, first_id) if after < first_id else None


def _through_end(entries: list[Entry]) -> list[Entry]:
    """`entries` up to and including the first `end`."""
    for i, entry in enumerate(entries):
        if entry.is_end:
            return entries[: i + 1]
    return entries


def blob_kind(event: Event) -> bytes:
    """The prefix of the blob ref of `event` (the blob's kind decides how it is spliced)."""
    if event.name.startswith(MESSAGES_EVENT):
        return DELTA_REF if event.content_only else NODE_REF
    return CONTENT_REF if event.content_only else b""


def stored_blob(event: Event) -> bytes:
    """The blob stored for `event` (see `_BLOB_NAMED` for protocol `messages`)."""
    assert event.blob is not None
    if event.name.startswith(MESSAGES_EVENT):
        return event.name.encode() + b"\x00" + event.blob
    return event.blob


def entry_name(event: Event, ref: bytes) -> tuple[str, bytes]:
    """The stored (name, blob ref field) of `event`, whose blob is `ref`."""
    if event.name.startswith(MESSAGES_EVENT):
        return PROTOCOL_ONLY + ref.decode(), b""
    return event.name, ref


def _inline(event: Event) -> bytes:
    if event.blob is None or event.name.startswith(MESSAGES_EVENT):
        return event.data
    if event.content_only:
        return codec.splice_content(event.data, event.blob)
    return codec.splice_tuple(event.data, event.blob)


class BlobResolver:
    """Splices a `messages` chunk with its run-level metadata blob, fetching each blob once."""

    def __init__(self, log: EventLog, run_id: str) -> None:
        self._log = log
        self._run_id = run_id
        self._cache: dict[bytes, bytes] = {}

    async def resolve_all(self, entries: list[Entry]) -> list[Entry]:
        """`entries` with their blobs spliced in; blobs not yet cached are fetched first."""
        await self.fetch(entries)
        return self.splice_all(entries)

    def cached(self, entries: list[Entry]) -> bool:
        """Whether every blob `entries` name is cached: `splice_all` needs no `fetch`."""
        cache = self._cache
        return all(e.blob_ref is None or e.blob_ref in cache for e in entries)

    async def fetch(self, entries: list[Entry]) -> None:
        """Cache the blobs `entries` name that are not cached yet (one round trip)."""
        cache = self._cache
        missing = {e.blob_ref for e in entries if e.blob_ref is not None} - cache.keys()
        if missing:
            cache.update(await self._log.blobs(self._run_id, sorted(missing)))

    def splice_all(self, entries: list[Entry]) -> list[Entry]:
        """`entries` with their cached blobs spliced in (an error in place of one not stored)."""
        return [self._splice(e) if e.blob_ref is not None else e for e in entries]

    async def history(self, rows: list[bytes]) -> History | None:
        """A catch-up page (`ROW_WIDTH` values per entry, cut after `end`) with every blob it
        names fetched, or None when it is empty. One pass over the rows, no object per entry."""
        cache = self._cache
        missing: set[bytes] = set()
        ends = False
        for i in range(0, len(rows), ROW_WIDTH):
            name, ref = rows[i + 1], rows[i + 3]
            if ref:
                if ref not in cache:
                    missing.add(ref)
            elif name[:2] in _NAMED_REFS and name[1:] not in cache:
                missing.add(name[1:])  # a protocol `messages` entry names its blob
            if name == _END:
                rows = rows[: i + ROW_WIDTH]
                ends = True
                break
        if not rows:
            return None
        if missing:
            cache.update(await self._log.blobs(self._run_id, sorted(missing)))
        return History(rows, cache, StreamId.parse(rows[-ROW_WIDTH]), ends)

    async def resolve(self, entry: Entry) -> Entry:
        return (await self.resolve_all([entry]))[0]

    def _splice(self, entry: Entry) -> Entry:
        return spliced(entry, self._cache)


_END = END_EVENT.encode()


def spliced(entry: Entry, blobs: dict[bytes, bytes]) -> Entry:
    """`entry` with its blob (from `blobs`) spliced in; an error in its place when the blob is
    no longer stored."""
    ref = entry.blob_ref
    if ref is None:
        return entry
    blob = blobs.get(ref)
    if blob is None:
        # The blob is gone (expired or deleted apart from the stream): an error in the
        # entry's place, never a chunk spliced with made-up metadata.
        return Entry(entry.id, "error", codec.error_payload(
            "MissingMetadata",
            f"the metadata of event {entry.id} ({entry.name}) is no longer stored",
        ))  # fmt: skip
    if ref.startswith(DELTA_REF):
        name, node, head = blob.split(b"\x00", 2)
        data = head + entry.data + b"}}"
        return Entry(entry.id, name.decode(), data, node=node or None)
    if ref.startswith(NODE_REF):
        name, _, node = blob.partition(b"\x00")
        return Entry(entry.id, name.decode(), entry.data, node=node or None)
    if ref.startswith(CONTENT_REF):
        return Entry(entry.id, entry.name, codec.splice_content(entry.data, blob))
    return Entry(entry.id, entry.name, codec.splice_tuple(entry.data, blob))
