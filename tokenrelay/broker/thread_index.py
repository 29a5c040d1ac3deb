"""The thread index: the threads a search matches, in the order it asks for, without reading
every thread.

Sorted sets under the hash tag ``{threads}`` (broker/keys.py): every thread by creation and by
last update, the threads per recorded status (``idle``, ``error``; ``busy`` for those that may
have an active run) and per metadata key and value. They are maintained by the writes that
change a thread (ThreadStore, RunStore) and intersected in Redis, so a search reads one page of
candidates. A candidate is checked against the thread before it is returned: the status sets
are a superset (a thread's status also depends on its active run and its checkpoint's pending
interrupts), never a subset.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from tokenrelay.broker import codec
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.scripts import AnyPipeline

RECORDED = ("idle", "error")
"""Statuses a thread's last run records; ``interrupted`` is an idle thread with pending tasks."""

QUERY_TTL_SECONDS = 30
"""A search's intermediate set outlives the search only if its clean-up failed."""


MAX_METADATA_KEYS = 128
"""Keys of one thread's metadata (422 past it): each pair is an index entry."""

INDEXED_VALUE_BYTES = 256
"""Metadata pairs longer than this (encoded) are not indexed: a filter on one reads threads."""


def metadata_digest(key: str, value: Any) -> str | None:
    """The digest naming the index set of one metadata pair, None when it is not indexed."""
    encoded = codec.canonical_json([key, value])
    if len(encoded) > INDEXED_VALUE_BYTES:
        return None
    return hashlib.sha256(encoded).hexdigest()[:32]


def indexed(metadata: Mapping[str, Any] | None) -> bool:
    """Whether every pair of a metadata filter has an index set."""
    return all(metadata_digest(k, v) is not None for k, v in (metadata or {}).items())


@dataclass(slots=True)
class Matches:
    """A search's candidates in order, read a page at a time."""

    redis: RedisClient
    key: str
    descending: bool
    owned: bool

    async def page(self, start: int, count: int) -> list[str]:
        if count <= 0:
            return []
        ids = cast(
            list[bytes],
            await self.redis.zrange(self.key, start, start + count - 1, desc=self.descending),
        )
        return [i.decode() for i in ids]

    async def size(self) -> int:
        return int(await self.redis.zcard(self.key))

    async def close(self) -> None:
        if self.owned:
            await self.redis.delete(self.key)


class ThreadIndex:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    def _metadata_keys(self, metadata: Mapping[str, Any]) -> set[str]:
        digests = (metadata_digest(k, v) for k, v in metadata.items())
        return {self._keys.threads_with_metadata(d) for d in digests if d is not None}

    async def added(self, thread_id: str, ts: int, metadata: Mapping[str, Any]) -> None:
        """The index entries of a thread just created (`added_in`), in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        self.added_in(pipe, thread_id, ts, metadata)
        await pipe.execute()

    def added_in(
        self, pipe: AnyPipeline, thread_id: str, ts: int, metadata: Mapping[str, Any]
    ) -> None:
        """Queue on `pipe` the index entries of a thread just created."""
        k = self._keys
        pipe.zadd(k.threads_index(), {thread_id: ts})
        pipe.zadd(k.threads_by_update(), {thread_id: ts})
        pipe.zadd(k.threads_with_status("idle"), {thread_id: 0})
        for key in self._metadata_keys(metadata):
            pipe.zadd(key, {thread_id: 0})

    async def updated(self, thread_id: str, ts: int) -> None:
        # xx: a thread deleted meanwhile is not brought back.
        await self._redis.zadd(self._keys.threads_by_update(), {thread_id: ts}, xx=True)

    async def metadata_changed(
        self, thread_id: str, before: Mapping[str, Any], after: Mapping[str, Any], ts: int
    ) -> None:
        old, new = self._metadata_keys(before), self._metadata_keys(after)
        pipe = self._redis.pipeline(transaction=False)
        for key in old - new:
            pipe.zrem(key, thread_id)
        for key in new - old:
            pipe.zadd(key, {thread_id: 0})
        pipe.zadd(self._keys.threads_by_update(), {thread_id: ts}, xx=True)
        await pipe.execute()

    async def status_recorded(self, thread_id: str, status: str, ts: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self.status_recorded_in(pipe, thread_id, status, ts)
        await pipe.execute()

    def status_recorded_in(self, pipe: AnyPipeline, thread_id: str, status: str, ts: int) -> None:
        """Queue `status_recorded` on `pipe`."""
        for other in RECORDED:
            if other != status:
                pipe.zrem(self._keys.threads_with_status(other), thread_id)
        pipe.zadd(self._keys.threads_with_status(status), {thread_id: 0})
        pipe.zadd(self._keys.threads_by_update(), {thread_id: ts}, xx=True)

    async def busy(self, thread_id: str) -> None:
        await self._redis.zadd(self._keys.threads_with_status("busy"), {thread_id: 0})

    def busy_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        pipe.zadd(self._keys.threads_with_status("busy"), {thread_id: 0})

    async def not_busy(self, thread_id: str) -> None:
        await self._redis.zrem(self._keys.threads_with_status("busy"), thread_id)

    def not_busy_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        pipe.zrem(self._keys.threads_with_status("busy"), thread_id)

    async def removed(self, thread_id: str, metadata: Mapping[str, Any]) -> None:
        k = self._keys
        pipe = self._redis.pipeline(transaction=False)
        for key in (
            k.threads_index(),
            k.threads_by_update(),
            *(k.threads_with_status(s) for s in (*RECORDED, "busy")),
            *self._metadata_keys(metadata),
        ):
            pipe.zrem(key, thread_id)
        await pipe.execute()

    async def matches(
        self,
        *,
        metadata: Mapping[str, Any] | None = None,
        status: str | None = None,
        sort_by: str = "updated_at",
        descending: bool = True,
    ) -> Matches:
        """The threads whose index entries match, ordered by `sort_by` (created_at, updated_at,
        state_updated_at or thread_id)."""
        k = self._keys
        base = (
            k.threads_index() if sort_by in ("created_at", "thread_id") else k.threads_by_update()
        )
        filters = sorted(self._metadata_keys(metadata or {}))
        if status is not None:
            filters.append(k.threads_with_status("idle" if status == "interrupted" else status))
        if not filters and sort_by != "thread_id":
            return Matches(self._redis, base, descending, owned=False)
        # Only the sort key's scores count; thread_id order is the members' order at equal
        # (zero) scores.
        weights = {base: 0 if sort_by == "thread_id" else 1, **dict.fromkeys(filters, 0)}
        dest = k.threads_query(uuid.uuid4().hex)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zinterstore(dest, weights)
        pipe.expire(dest, QUERY_TTL_SECONDS)
        await pipe.execute()
        return Matches(self._redis, dest, descending, owned=True)
