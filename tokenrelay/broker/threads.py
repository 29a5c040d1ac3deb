"""Thread records (``tr:thread:{T}:meta``)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any, cast

from tokenrelay.broker import codec, pubsub, scripts
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.errors import Conflict, InvalidBody, ThreadNotFound
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.runs import new_id, now_ms
from tokenrelay.broker.scripts import AnyPipeline, RoundTrip, in_sequence
from tokenrelay.broker.thread_index import MAX_METADATA_KEYS, ThreadIndex

RUN_STARTED = codec.pack([b"", []])
"""What `announce_run_in` publishes: an empty live batch, so the API's fan-out needs no new kind."""


def _check_metadata(metadata: dict[str, Any]) -> None:
    # Each pair is an entry of the thread index: a bounded number per thread.
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidBody(f"A thread's metadata has at most {MAX_METADATA_KEYS} keys")


@dataclass(slots=True)
class ThreadRecord:
    thread_id: str
    created_at: int
    updated_at: int
    metadata: dict[str, Any] = field(default_factory=dict)


METADATA_TRIES = 50
"""How many times a metadata merge is made again on metadata another writer changed (each
loser waits a little longer, at random, so a crowd of writers spreads out)."""


class ThreadStore:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._advance_seq = scripts.script("advance_seq")
        self._set_metadata = scripts.script("set_metadata")
        self._create = scripts.script("create_thread")
        self.index = ThreadIndex(redis, keys)

    async def last_seq(self, thread_id: str) -> int:
        """The seq of the last event the thread's finished runs wrote (0: none yet)."""
        raw = await self._redis.hget(self._keys.thread_meta(thread_id), "seq")  # type: ignore[misc]
        return int(raw or 0)

    async def advance_seq(self, thread_id: str, last: int) -> None:
        """Record that the thread's events reach seq `last` (never lowers it)."""
        await self._advance_seq(self._redis, [self._keys.thread_meta(thread_id)], [last])

    def advance_seq_in(self, trip: RoundTrip, thread_id: str, last: int) -> None:
        """Queue `advance_seq` on `trip`."""
        trip.script(self._advance_seq, [self._keys.thread_meta(thread_id)], [last])

    def last_seq_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        """Queue `last_seq` on `pipe`; its reply is the seq as stored (None: none yet)."""
        pipe.hget(self._keys.thread_meta(thread_id), "seq")

    def announce_run_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        """Queue on `pipe` the wake-up of the thread's protocol subscribers: a run started and
        its events follow."""
        pubsub.publish_in(pipe, self._redis, self._keys.thread_live(thread_id), RUN_STARTED)

    async def create(
        self,
        thread_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        if_exists: str = "raise",
    ) -> ThreadRecord:
        """Create a thread; an existing id raises Conflict, or is returned with `do_nothing`.
        Without `thread_id` the thread gets a new id, which no thread can have: it is written
        without asking Redis first whether it exists. With one, the record is made whole in one
        step only if the id is free, so no half-made record is ever left (a client gone, a
        process stopped midway), and the same step sent again finds it made."""
        _check_metadata(metadata or {})
        tid = thread_id or new_id()
        key = self._keys.thread_meta(tid)
        ts = now_ms()
        record = ThreadRecord(tid, ts, ts, dict(metadata or {}))
        packed = codec.json_bytes(record.metadata)
        if thread_id is not None:
            if not await self._create(self._redis, [key], [tid, ts, packed]):
                if if_exists == "do_nothing":
                    return await self.get(tid)
                raise Conflict(f"Thread with ID {tid} already exists")
            await self.index.added(tid, ts, record.metadata)
            return record
        fields = {"thread_id": tid, "created_at": ts, "updated_at": ts, "metadata": packed}
        # Indexed only once its fields are there (a search reads the hash of each id it finds).
        await in_sequence(
            self._redis,
            lambda pipe: pipe.hset(key, mapping=fields),  # type: ignore[arg-type]
            lambda pipe: self.index.added_in(pipe, tid, ts, record.metadata),
        )
        return record

    async def get(self, thread_id: str) -> ThreadRecord:
        h = await self._redis.hgetall(self._keys.thread_meta(thread_id))  # type: ignore[misc]
        return self.record(thread_id, cast(dict[bytes, bytes], h))

    def get_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        """Queue `get` on `pipe`; `record` reads its reply."""
        pipe.hgetall(self._keys.thread_meta(thread_id))

    @staticmethod
    def record(thread_id: str, h: dict[bytes, bytes]) -> ThreadRecord:
        """The thread stored as the hash `h`; ThreadNotFound when there is none."""
        if not h or b"created_at" not in h:
            raise ThreadNotFound(thread_id)
        return ThreadRecord(
            thread_id=thread_id,
            created_at=int(h[b"created_at"]),
            updated_at=int(h[b"updated_at"]),
            metadata=codec.json_loads(h.get(b"metadata") or b"{}"),
        )

    async def exists(self, thread_id: str) -> bool:
        return bool(await self._redis.hexists(self._keys.thread_meta(thread_id), "created_at"))  # type: ignore[misc]

    async def touch(self, thread_id: str) -> None:
        ts = now_ms()
        await self._redis.hset(self._keys.thread_meta(thread_id), "updated_at", ts)  # type: ignore[misc]
        await self.index.updated(thread_id, ts)

    async def set_status(self, thread_id: str, status: str) -> None:
        """Record how the thread's last run left it: idle, error or interrupted."""
        ts = now_ms()
        await self._redis.hset(  # type: ignore[misc]
            self._keys.thread_meta(thread_id), mapping={"status": status, "updated_at": ts}
        )
        await self.index.status_recorded(thread_id, status, ts)

    def set_status_in(self, pipe: AnyPipeline, thread_id: str, status: str, ts: int) -> None:
        """Queue `set_status`'s write of the thread on `pipe` (the index has its own,
        `ThreadIndex.status_recorded_in`)."""
        pipe.hset(self._keys.thread_meta(thread_id), mapping={"status": status, "updated_at": ts})

    async def last_status(self, thread_id: str) -> str:
        raw = cast(
            bytes | None, await self._redis.hget(self._keys.thread_meta(thread_id), "status")
        )  # type: ignore[misc]
        return raw.decode() if raw else "idle"

    async def update_metadata(self, thread_id: str, metadata: dict[str, Any]) -> ThreadRecord:
        """Merge `metadata` into the thread's. Two merges at once both land: each is written
        only over the metadata it read, and is made again on what the other wrote (bounded:
        past `METADATA_TRIES` it is a Conflict to retry)."""
        key = self._keys.thread_meta(thread_id)
        for attempt in range(METADATA_TRIES):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            h = cast(dict[bytes, bytes], await self._redis.hgetall(key))  # type: ignore[misc]
            thread = self.record(thread_id, h)
            before = dict(thread.metadata)
            thread.metadata.update(metadata)
            _check_metadata(thread.metadata)
            thread.updated_at = now_ms()
            written = await self._set_metadata(
                self._redis,
                [key],
                [h.get(b"metadata", b""), codec.json_bytes(thread.metadata), thread.updated_at],
            )
            if written == -1:
                raise ThreadNotFound(thread_id)
            if written == 1:
                await self.index.metadata_changed(
                    thread_id, before, thread.metadata, thread.updated_at
                )
                return thread
        raise Conflict(
            f"Thread {thread_id}'s metadata kept changing while this update was made; retry it"
        )

    async def delete(self, thread_id: str) -> None:
        thread = await self.get(thread_id)
        await self._redis.delete(  # one slot: the thread's hash tag
            self._keys.thread_meta(thread_id),
            self._keys.thread_runs(thread_id),
            self._keys.thread_active(thread_id),
            self._keys.thread_pending(thread_id),
            self._keys.thread_since(thread_id),
            self._keys.thread_released(thread_id),
        )
        await self.index.removed(thread_id, thread.metadata)

    async def retire(self, thread_id: str, ttl_seconds: int) -> None:
        """Take a thread out of listings and let its records expire with its runs' (a
        stateless run's thread: nothing may be left behind)."""
        pipe = self._redis.pipeline(transaction=False)
        self.retire_in(pipe, thread_id, ttl_seconds)
        await pipe.execute()

    def retire_in(self, pipe: AnyPipeline, thread_id: str, ttl_seconds: int) -> None:
        """Queue `retire` on `pipe`."""
        k = self._keys
        for key in (k.thread_meta(thread_id), k.thread_runs(thread_id)):
            pipe.expire(key, ttl_seconds)
        pipe.delete(
            k.thread_pending(thread_id), k.thread_since(thread_id), k.thread_released(thread_id)
        )
        pipe.zrem(k.threads_index(), thread_id)

    async def list_ids(self) -> list[str]:
        """Every thread id, newest first (for the searches the index cannot answer)."""
        ids = cast(list[bytes], await self._redis.zrevrange(self._keys.threads_index(), 0, -1))
        return [i.decode() for i in ids]
