"""The run queue: a Redis Stream with one consumer group; the API enqueues, any worker claims."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, cast

from redis.exceptions import ResponseError

from broker import codec
from broker.connection import RedisClient
from broker.keys import Keys
from broker.models import Job

GROUP = "workers"


class RunQueue:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.queue()

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) once; later calls are no-ops."""
        try:
            await self._redis.xgroup_create(self._key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, job: Job) -> None:
        await self._redis.xadd(self._key, {"j": codec.pack(asdict(job))})

    async def claim(self, consumer: str, count: int, block_ms: int) -> list[tuple[bytes, Job]]:
        """Up to `count` new jobs for `consumer`, waiting at most `block_ms` for the first."""
        reply = cast(
            list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
            await self._redis.xreadgroup(
                GROUP, consumer, {self._key: ">"}, count=count, block=block_ms
            ),
        )
        jobs: list[tuple[bytes, Job]] = []
        for _stream, rows in reply or ():
            for msg_id, fields in rows:
                jobs.append((msg_id, Job(**codec.unpack(fields[b"j"]))))
        return jobs

    async def renew(self, consumer: str, msg_ids: list[bytes]) -> None:
        """Reset the idle time of `consumer`'s jobs: the lease renewal other workers watch."""
        if msg_ids:
            await self._redis.xclaim(self._key, GROUP, consumer, 0, list[Any](msg_ids), justid=True)

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[tuple[bytes, Job]]:
        """Take over up to `count` jobs whose owner has not renewed them for `min_idle_ms`."""
        reply: list[Any] = await self._redis.xautoclaim(
            self._key, GROUP, consumer, min_idle_ms, start_id="0-0", count=count
        )
        jobs: list[tuple[bytes, Job]] = []
        for msg_id, fields in reply[1]:
            if fields and b"j" in fields:
                jobs.append((msg_id, Job(**codec.unpack(fields[b"j"]))))
            else:  # its payload is gone: nothing to run
                await self.ack(msg_id)
        return jobs

    async def depth(self) -> int:
        """Jobs waiting for a worker (not yet delivered to any)."""
        groups: list[dict[str, Any]] = await self._redis.xinfo_groups(self._key)
        for g in groups:
            name = g.get("name")
            if name in (GROUP, GROUP.encode()):
                return int(g.get("lag") or 0)
        return 0

    async def ack(self, msg_id: bytes) -> None:
        """Acknowledge and drop a finished job."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xack(self._key, GROUP, msg_id)
        pipe.xdel(self._key, msg_id)
        await pipe.execute()
