"""The run queue: a Redis Stream with one consumer group; the API enqueues, any worker claims."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from tokenrelay.broker import codec, scripts
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import Job
from tokenrelay.broker.scripts import AnyPipeline, RoundTrip

GROUP = "workers"

_GROUP_NAMES = (GROUP, GROUP.encode())


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """Runs in the queue: `running` were claimed by a worker, `waiting` were not yet."""

    running: int
    waiting: int


class RunQueue:
    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.queue()
        self._delayed = keys.queue_delayed()
        self._renew = scripts.script("renew_jobs")
        self._ack = scripts.script("ack_job")
        self._reclaim = scripts.script("reclaim_jobs")
        self._clock = keys.lease_clock()

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) once; later calls are no-ops."""
        try:
            await self._redis.xgroup_create(self._key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, job: Job) -> bytes:
        """Queue `job`; returns its entry id, or b"" for a job that starts later: it waits
        apart until `promote_due` queues it."""
        pipe = self._redis.pipeline(transaction=False)
        later = self.enqueue_in(pipe, job)
        (reply,) = await pipe.execute()
        return b"" if later else cast(bytes, reply)

    def enqueue_in(self, pipe: AnyPipeline, job: Job) -> bool:
        """Queue `enqueue` on `pipe` (one command); returns whether the job waits apart."""
        packed = codec.pack(asdict(job))
        if job.not_before > time.time() * 1000:
            pipe.zadd(self._delayed, {packed: job.not_before})
            return True
        pipe.xadd(self._key, {"j": packed})
        return False

    async def promote_due(self, limit: int = 100) -> int:
        """Queue up to `limit` of the jobs put off until now; returns how many."""
        now = int(time.time() * 1000)
        due = cast(
            list[bytes],
            await self._redis.zrangebyscore(self._delayed, "-inf", now, start=0, num=limit),
        )
        moved = 0
        for packed in due:
            # Whoever takes a job out of the set queues it, so it is queued once. A job lost
            # between the two (its worker stopped there) is a run never queued, which its
            # thread's repair ends (`contains` no longer finds it).
            if await self._redis.zrem(self._delayed, packed):
                await self._redis.xadd(self._key, {"j": packed})
                moved += 1
        return moved

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

    async def renew(
        self, consumer: str, msg_ids: list[bytes], stray_ms: int
    ) -> tuple[list[bytes], list[bytes]]:
        """Reset the idle time of `consumer`'s jobs: the lease renewal other workers watch.

        Returns the jobs `consumer` no longer owns (taken over by another worker, or gone):
        their runs were superseded, and renewing them would steal them back. Then its strays:
        the jobs it holds, idle for `stray_ms`, that it did not name (`adopt` takes them)."""
        lost, strays = await self._renew(
            self._redis, [self._key], [GROUP, consumer, stray_ms, *msg_ids]
        )
        return [bytes(m) for m in lost], [bytes(m) for m in strays]

    async def adopt(
        self, consumer: str, msg_ids: list[bytes], min_idle_ms: int
    ) -> list[tuple[bytes, Job]]:
        """The jobs of `msg_ids` that `consumer` still holds, idle for `min_idle_ms`, claimed
        again (which resets their idle time) with what they carry, to be started now: jobs a
        read delivered to `consumer` whose reply it never received."""
        ids: list[Any] = list(msg_ids)
        rows = cast(
            list[Any], await self._redis.xclaim(self._key, GROUP, consumer, min_idle_ms, ids)
        )
        return await self._taken(consumer, [(row[0], row[1] or {}) for row in rows if row])

    async def reclaim(
        self, consumer: str, lease_ms: int, count: int, stall_ms: int
    ) -> list[tuple[bytes, Job]]:
        """Take over up to `count` jobs whose owner has not renewed them for `lease_ms`, unless
        the lease clock shows that nobody could renew lately: no worker read it for `stall_ms`
        (Redis paused or cut off), so owners get a lease to renew first. Every worker calls
        this at each heartbeat, with `count` 0 when it has no room (it only reads the clock)."""
        reply = cast(
            list[Any],
            await self._reclaim(
                self._redis, [self._key, self._clock], [GROUP, consumer, lease_ms, count, stall_ms]
            ),
        )
        rows = []
        for row in reply:
            msg_id, flat = (row[0], row[1]) if row else (b"", None)
            rows.append((msg_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}))
        return await self._taken(consumer, rows)

    async def _taken(
        self, consumer: str, rows: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> list[tuple[bytes, Job]]:
        """The jobs of entries `consumer` has just claimed; an entry whose payload is gone has
        nothing to run and is acknowledged."""
        jobs: list[tuple[bytes, Job]] = []
        for msg_id, fields in rows:
            if b"j" in fields:
                jobs.append((bytes(msg_id), Job(**codec.unpack(fields[b"j"]))))
            elif msg_id:
                await self.ack(bytes(msg_id), consumer)
        return jobs

    async def holds(self, msg_id: str) -> bool:
        """Whether the job `msg_id` is still in the queue (it leaves when acknowledged)."""
        return bool(await self._redis.xrange(self._key, min=msg_id, max=msg_id, count=1))

    async def contains(self, run_id: str) -> bool:
        """Whether a job of `run_id` is in the queue (waiting or being run). Reads the whole
        queue: only for repairs, never on a hot path."""
        last = "-"
        while True:
            rows = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await self._redis.xrange(self._key, min=last, max="+", count=1000),
            )
            for _msg_id, fields in rows:
                if b"j" in fields and codec.unpack(fields[b"j"]).get("run_id") == run_id:
                    return True
            if len(rows) < 1000:
                break
            last = "(" + rows[-1][0].decode()
        delayed = cast(list[bytes], await self._redis.zrange(self._delayed, 0, -1))
        return any(codec.unpack(packed).get("run_id") == run_id for packed in delayed)

    async def depth(self) -> int:
        """Jobs waiting for a worker (not yet delivered to any)."""
        groups: list[dict[str, Any]] = await self._redis.xinfo_groups(self._key)
        for g in groups:
            name = g.get("name")
            if name in _GROUP_NAMES:
                return int(g.get("lag") or 0)
        return 0

    async def load(self) -> QueueLoad:
        """How many runs are running and waiting, across every worker. A job stays in the
        queue until its run has ended (it is then acknowledged and deleted), so the claimed
        ones are the group's pending entries and the rest are waiting."""
        # Read together (MULTI): an ack landing between the two reads would show its job as
        # waiting.
        pipe = self._redis.pipeline(transaction=True)
        pipe.xlen(self._key)
        pipe.xinfo_groups(self._key)
        length, groups = await pipe.execute(raise_on_error=False)
        length = int(length)
        if isinstance(groups, ResponseError):  # no queue yet: no worker has started
            return QueueLoad(running=0, waiting=length)
        if isinstance(groups, Exception):
            raise groups
        running = sum(int(g.get("pending") or 0) for g in groups if g.get("name") in _GROUP_NAMES)
        return QueueLoad(running=running, waiting=max(0, length - running))

    async def ack(self, msg_id: bytes, consumer: str) -> bool:
        """Acknowledge and drop a finished job if `consumer` still owns it (a superseded worker
        must not drop the job its successor holds); returns whether it did."""
        return bool(await self._ack(self._redis, [self._key], [GROUP, consumer, msg_id]))

    def ack_in(self, trip: RoundTrip, msg_id: bytes, consumer: str) -> int:
        """Queue `ack` on `trip`; returns where its reply will be."""
        return trip.script(self._ack, [self._key], [GROUP, consumer, msg_id])
