"""Run records (``tr:run:{R}:meta``) and a thread's runs, as both processes see them."""

from __future__ import annotations

import functools
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from tokenrelay.broker import codec, scripts
from tokenrelay.broker.connection import RedisClient, in_order
from tokenrelay.broker.errors import RunExpired, RunLost, RunNotFound
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import Job, RunStatus
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.scripts import AnyPipeline, RoundTrip, in_sequence
from tokenrelay.broker.thread_index import ThreadIndex

RELEASE_MEMORY_SECONDS = 600
"""How long a thread remembers its last release (`release_active`), for a release sent again
because its reply was lost: longer than a client's retries and a worker's retried steps."""


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    """A UUID version 7: random, and ordered by its creation time, which it carries (see
    `id_created_ms`), so a run that is not found can be told apart from one never made."""
    ms = now_ms()
    rand = int.from_bytes(os.urandom(10))
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    return str(uuid.UUID(int=value))


def id_created_ms(value: str) -> int | None:
    """When `value` was made, if it is a version-7 UUID."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return parsed.int >> 80 if parsed.version == 7 else None


@dataclass(slots=True)
class RunRecord:
    run_id: str
    thread_id: str
    assistant_id: str
    status: RunStatus
    created_at: int
    updated_at: int
    attempt: int = 0
    """Attempts started so far; 0 while the run waits for its first worker."""
    worker: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    multitask_strategy: str = "reject"
    on_disconnect: str = "continue"
    error: str = ""
    checkpoint_id: str = ""
    seq: int = 0
    """Last event batch applied to the run's stream (see scripts/append.lua)."""
    seq_base: int = 0
    """The thread seq of the run's first event; 0 until a worker starts it."""
    job: str = ""
    """The queue entry its current attempt runs from."""

    @property
    def starts_at(self) -> int:
        """When the run may start (ms), if its client put it off (`after_seconds`), else 0."""
        delay = self.kwargs.get("after_seconds") or 0
        return self.created_at + int(delay * 1000) if delay > 0 else 0

    @property
    def stream_modes(self) -> list[str]:
        return list(self.kwargs.get("stream_mode") or ["values"])

    def to_hash(self) -> dict[str, bytes | str | int]:
        return {
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "assistant_id": self.assistant_id,
            "status": self.status.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "attempt": self.attempt,
            "worker": self.worker,
            "metadata": codec.json_bytes(self.metadata),
            "kwargs": codec.json_bytes(self.kwargs),
            "multitask_strategy": self.multitask_strategy,
            "on_disconnect": self.on_disconnect,
            "error": self.error,
            "checkpoint_id": self.checkpoint_id,
        }

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> RunRecord:
        s = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            run_id=s["run_id"],
            thread_id=s["thread_id"],
            assistant_id=s["assistant_id"],
            status=RunStatus(s["status"]),
            created_at=int(s["created_at"]),
            updated_at=int(s["updated_at"]),
            attempt=int(s.get("attempt") or 0),
            worker=s.get("worker", ""),
            metadata=codec.json_loads(s.get("metadata") or "{}"),
            kwargs=codec.json_loads(s.get("kwargs") or "{}"),
            multitask_strategy=s.get("multitask_strategy", "reject"),
            on_disconnect=s.get("on_disconnect", "continue"),
            error=s.get("error", ""),
            checkpoint_id=s.get("checkpoint_id", ""),
            seq=int(s.get("seq") or 0),
            seq_base=int(s.get("s0") or 0),
            job=s.get("job", ""),
        )


class RunStore:
    """Create, read and update run records; hand new runs to the queue."""

    def __init__(self, redis: RedisClient, keys: Keys, *, ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl_seconds
        self._release = scripts.script("release_active")
        self._index = ThreadIndex(redis, keys)
        self._start = scripts.script("start_attempt")
        self._claim = scripts.script("claim_thread")
        self._update = scripts.script("update_run")

    async def create(self, run: RunRecord) -> Job:
        """Store `run` as pending and list it on its thread; returns its queue job."""
        # Listed on its thread only once its hash is there: a reader that finds an id in the
        # list without a hash takes the run for expired.
        await in_sequence(
            self._redis,
            functools.partial(self._record_in, run),
            functools.partial(self._list_in, run),
        )
        return Job(run.run_id, run.thread_id, run.assistant_id)

    def _record_in(self, run: RunRecord, pipe: AnyPipeline) -> None:
        pipe.hset(self._keys.run_meta(run.run_id), mapping=run.to_hash())  # type: ignore[arg-type]
        pipe.expire(self._keys.run_meta(run.run_id), self._ttl)

    def _list_in(self, run: RunRecord, pipe: AnyPipeline) -> None:
        pipe.zadd(self._keys.thread_runs(run.thread_id), {run.run_id: run.created_at})

    async def create_and_claim(self, run: RunRecord, *, enqueue: bool) -> tuple[str, str]:
        """`create`, then `claim_thread` for it (the busy mark left to `queue_started`): in one
        round trip where one server applies a pipeline in order, so the thread names the run
        only once its hash is there, as when the claim follows in a trip of its own (a
        cluster). Raises the first error of either; the run may then be recorded, or claim
        its thread, without the other."""
        if not in_order(self._redis):
            await self.create(run)
            return await self.claim_thread(run.thread_id, run.run_id, enqueue=enqueue,
                                           mark_busy=False)  # fmt: skip
        trip = RoundTrip(self._redis)
        self._record_in(run, trip.pipe)
        self._list_in(run, trip.pipe)
        at = trip.script(self._claim, *self._claim_call(run.thread_id, run.run_id, enqueue))
        replies = await trip.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return self._claimed(replies[at])

    async def claim_thread(
        self, thread_id: str, run_id: str, *, enqueue: bool, mark_busy: bool
    ) -> tuple[str, str]:
        """Make `run_id` the thread's active run: ('started', ''), ('queued', '') behind the
        active run when `enqueue`, else ('busy', <active run id>). With `mark_busy` a started
        run's thread is marked busy in the index here; the API leaves that to `queue_started`,
        which marks it in the round trip that queues the run."""
        verdict, active = self._claimed(
            await self._claim(self._redis, *self._claim_call(thread_id, run_id, enqueue))
        )
        if verdict == "started" and mark_busy:
            await self._index.busy(thread_id)
        return verdict, active

    def _claim_call(self, thread_id: str, run_id: str, enqueue: bool
    ) -> tuple[list[str], list[Any]]:  # fmt: skip
        k = self._keys
        keys = [k.thread_active(thread_id), k.thread_pending(thread_id), k.thread_since(thread_id)]
        return keys, [run_id, "enqueue" if enqueue else "", now_ms()]

    @staticmethod
    def _claimed(reply: list[bytes]) -> tuple[str, str]:
        return reply[0].decode(), reply[1].decode() if len(reply) > 1 else ""

    async def queue_started(self, queue: RunQueue, job: Job) -> None:
        """Mark the thread of a run that just claimed it busy, then queue the run: in one round
        trip where the two take effect in order (the run's end unmarks the thread, which must
        not come first)."""
        await in_sequence(
            self._redis,
            lambda pipe: self._index.busy_in(pipe, job.thread_id),
            lambda pipe: queue.enqueue_in(pipe, job),
        )

    def job(self, run: RunRecord) -> Job:
        return Job(run.run_id, run.thread_id, run.assistant_id, run.starts_at)

    async def start_attempt(
        self, run_id: str, worker_id: str, max_attempts: int, job_id: bytes = b""
    ) -> tuple[str, int, int]:
        """Begin the next attempt of `run_id` for `worker_id`, run from the queue entry
        `job_id`: (verdict, attempt, applied seq); verdict is ``run``, ``done`` (already ended)
        or ``exhausted``."""
        reply = await self._start(self._redis, *self._start_call(run_id, worker_id, max_attempts,
                                                                  job_id))  # fmt: skip
        return self.attempt_of(reply)

    def start_attempt_in(
        self, trip: RoundTrip, run_id: str, worker_id: str, max_attempts: int, job_id: bytes = b""
    ) -> int:
        """Queue `start_attempt` on `trip`; returns where its reply will be (`attempt_of`)."""
        return trip.script(self._start, *self._start_call(run_id, worker_id, max_attempts, job_id))

    def _start_call(
        self, run_id: str, worker_id: str, max_attempts: int, job_id: bytes
    ) -> tuple[list[str], list[Any]]:
        keys = [self._keys.run_meta(run_id), self._keys.run_cancel(run_id)]
        return keys, [worker_id, now_ms(), max_attempts, job_id]

    @staticmethod
    def attempt_of(reply: list[Any]) -> tuple[str, int, int]:
        """`start_attempt`'s answer from its script's reply."""
        verdict, attempt, seq = reply
        return verdict.decode(), int(attempt), int(seq)

    async def assign_seq_base(self, run_id: str, after: int) -> int:
        """Number the run's events from `after` + 1 on (the thread's last seq), unless an
        earlier attempt already did; returns the run's first seq."""
        pipe = self._redis.pipeline(transaction=False)
        self.assign_seq_base_in(pipe, run_id, after)
        _, base = await pipe.execute()
        return int(base)

    def assign_seq_base_in(self, pipe: AnyPipeline, run_id: str, after: int) -> None:
        """Queue `assign_seq_base` on `pipe`: two commands, the second replying the base."""
        key = self._keys.run_meta(run_id)
        pipe.hsetnx(key, "s0", after + 1)
        pipe.hget(key, "s0")

    async def last_seq(self, run_id: str) -> int:
        """The seq of the run's newest event (its first seq - 1 while it has none)."""
        pipe = self._redis.pipeline(transaction=False)
        self.last_seq_in(pipe, run_id)
        (reply,) = await pipe.execute()
        return self.last_seq_of(reply)

    def last_seq_in(self, pipe: AnyPipeline, run_id: str) -> None:
        """Queue `last_seq` on `pipe`; `last_seq_of` reads its reply."""
        pipe.hmget(self._keys.run_meta(run_id), ["s0", "n"])

    @staticmethod
    def last_seq_of(reply: list[bytes | None]) -> int:
        base, n = reply
        return int(base or 0) + int(n or 0) - 1

    async def thread_runs(
        self, thread_id: str, *, from_ms: int = 0, newest_first: bool = False
    ) -> list[tuple[str, int]]:
        """(run id, created_at) of the thread's runs created at `from_ms` or later."""
        key = self._keys.thread_runs(thread_id)
        if newest_first:
            rows = await self._redis.zrevrangebyscore(key, "+inf", from_ms, withscores=True)
        else:
            rows = await self._redis.zrangebyscore(key, from_ms, "+inf", withscores=True)
        return [(rid.decode(), int(score)) for rid, score in cast(list[tuple[bytes, float]], rows)]

    async def get(self, run_id: str) -> RunRecord:
        h = cast(dict[bytes, bytes], await self._redis.hgetall(self._keys.run_meta(run_id)))  # type: ignore[misc]
        return self.record(run_id, h)

    def get_in(self, pipe: AnyPipeline, run_id: str) -> None:
        """Queue `get` on `pipe`; `record` (or `found`) reads its reply."""
        pipe.hgetall(self._keys.run_meta(run_id))

    @staticmethod
    def record(run_id: str, h: dict[bytes, bytes]) -> RunRecord:
        """The run from its meta hash `h` as read; RunNotFound when there is none."""
        if not h or b"run_id" not in h:
            raise RunNotFound(run_id)
        return RunRecord.from_hash(h)

    async def find(self, thread_id: str, run_id: str) -> RunRecord:
        """The run `run_id` if it belongs to `thread_id`; RunExpired if it did but is gone."""
        h = cast(dict[bytes, bytes], await self._redis.hgetall(self._keys.run_meta(run_id)))  # type: ignore[misc]
        return await self.found(thread_id, run_id, h)

    async def found(self, thread_id: str, run_id: str, h: dict[bytes, bytes]) -> RunRecord:
        """`find`, given the run's meta hash `h` as read (see `get_in`)."""
        if not h or b"run_id" not in h:
            if await self._redis.zscore(self._keys.thread_runs(thread_id), run_id) is not None:
                raise RunExpired(run_id)
            created = id_created_ms(run_id)
            if created is not None and created < await self.data_since():
                raise RunLost(run_id)
            raise RunNotFound(run_id)
        run = RunRecord.from_hash(h)
        if run.thread_id != thread_id:
            raise RunNotFound(run_id)
        return run

    async def data_since(self) -> int:
        """Since when (ms) this Redis has held tokenrelay's data: a run made before then and
        not found was lost with an earlier Redis (or expired), not never made. Set by the
        first process that asks after Redis starts empty; renewed by the workers."""
        key = self._keys.epoch()
        await self._redis.set(key, now_ms(), nx=True, ex=self._ttl)
        raw = cast(bytes | None, await self._redis.get(key))
        return int(raw) if raw else now_ms()

    async def update(self, run_id: str, **fields: str | int) -> None:
        fields.setdefault("updated_at", now_ms())
        await self._redis.hset(self._keys.run_meta(run_id), mapping=fields)  # type: ignore[misc,arg-type]

    async def update_fenced(self, run_id: str, attempt: int, **fields: str | int) -> bool:
        """`update`, only while `attempt` is the run's current one; returns whether it wrote."""
        fields.setdefault("updated_at", now_ms())
        args: list[str | int] = [attempt]
        for name, value in fields.items():
            args += [name, value]
        return bool(await self._update(self._redis, [self._keys.run_meta(run_id)], args))

    async def active_run(self, thread_id: str) -> str | None:
        """The run active on the thread, if it is still pending or running.

        A pointer to a run that has ended (its worker writes the end before it releases the
        thread) or is gone (lost with its Redis, expired) does not make the thread busy."""
        return await self.unfinished(await self.active_pointer(thread_id))

    async def unfinished(self, pointer: str | None) -> str | None:
        """`pointer`, an active pointer as read, if its run is still pending or running."""
        if pointer is None:
            return None
        status = cast(bytes | None, await self._redis.hget(self._keys.run_meta(pointer), "status"))  # type: ignore[misc]
        if status is None or RunStatus(status.decode()).terminal:
            return None
        return pointer

    async def active_pointer(self, thread_id: str) -> str | None:
        """The thread's active pointer as stored, whatever became of its run."""
        raw = cast(bytes | None, await self._redis.get(self._keys.thread_active(thread_id)))
        return self.pointer_of(raw)

    def active_pointer_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        """Queue `active_pointer` on `pipe`; `pointer_of` reads its reply."""
        pipe.get(self._keys.thread_active(thread_id))

    @staticmethod
    def pointer_of(reply: bytes | None) -> str | None:
        return reply.decode() if reply else None

    async def active_since(self, thread_id: str) -> int:
        """When (ms) the thread's active pointer last named a new run; 0 if not recorded."""
        raw = cast(bytes | None, await self._redis.get(self._keys.thread_since(thread_id)))
        return int(raw) if raw and raw.isdigit() else 0

    async def release_active(self, thread_id: str, run_id: str) -> str | None:
        """Clear the thread's active pointer if it still names `run_id`; returns the queued run
        that became active in its place, if any."""
        keys, args = self._release_call(thread_id, run_id, new_id())
        promoted = self.promoted_of(await self._release(self._redis, keys, args))
        if promoted is None:
            await self._index.not_busy(thread_id)
            await self.keep_busy_if_claimed(thread_id)
        return promoted

    def release_active_in(self, trip: RoundTrip, thread_id: str, run_id: str, token: str) -> int:
        """Queue `release_active`'s compare-and-delete on `trip`; returns where its reply will
        be, which `promoted_of` reads. The caller then takes the thread out of the busy index
        (`not_busy_in`) if none was promoted, and after that calls `keep_busy_if_claimed`.
        `token` names the release: a caller that makes it again, not knowing whether it landed,
        passes the same one and gets the same answer."""
        return trip.script(self._release, *self._release_call(thread_id, run_id, token))

    def _release_call(self, thread_id: str, run_id: str, token: str
    ) -> tuple[list[str], list[Any]]:  # fmt: skip
        k = self._keys
        keys = [k.thread_active(thread_id), k.thread_pending(thread_id), k.thread_since(thread_id),
                k.thread_released(thread_id)]  # fmt: skip
        return keys, [run_id, now_ms(), token, RELEASE_MEMORY_SECONDS]

    @staticmethod
    def promoted_of(reply: bytes | None) -> str | None:
        """The run a release promoted, from its script's reply."""
        return reply.decode() if reply else None

    def not_busy_in(self, pipe: AnyPipeline, thread_id: str) -> None:
        """Queue taking the thread out of the busy index on `pipe`."""
        self._index.not_busy_in(pipe, thread_id)

    async def keep_busy_if_claimed(self, thread_id: str) -> None:
        """Mark the thread busy again if a run claimed it: called once it was taken out of the
        busy index, so a run claimed meanwhile leaves it marked busy."""
        await self.keep_busy_if_unfinished(thread_id, await self.active_pointer(thread_id))

    async def keep_busy_if_unfinished(self, thread_id: str, pointer: str | None) -> None:
        """`keep_busy_if_claimed` with the thread's active pointer as read once the thread was
        taken out of the busy index (`active_pointer_in`, in the same round trip)."""
        if await self.unfinished(pointer):
            await self._index.busy(thread_id)

    async def list(self, thread_id: str, *, limit: int, offset: int, status: str | None = None
    ) -> list[RunRecord]:  # fmt: skip
        """The thread's runs, newest first (expired ones are skipped)."""
        ids = cast(
            list[bytes], await self._redis.zrevrange(self._keys.thread_runs(thread_id), 0, -1)
        )
        runs: list[RunRecord] = []
        for rid in ids:
            try:
                run = await self.get(rid.decode())
            except RunNotFound:
                continue
            if status is None or run.status.value == status:
                runs.append(run)
        return runs[offset : offset + limit]

    async def delete(self, run: RunRecord) -> None:
        k = self._keys
        pipe = self._redis.pipeline(transaction=False)
        # One slot: the run's hash tag. The thread's index is another slot, another command.
        pipe.delete(k.run_meta(run.run_id), k.run_events(run.run_id), k.run_blobs(run.run_id))
        await pipe.execute()
        await self._redis.zrem(k.thread_runs(run.thread_id), run.run_id)
