"""The worker: claims runs from the queue and executes them, up to a concurrency bound."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker import codec
from broker.errors import RunNotFound
from broker.graphs import GraphRegistry
from broker.keys import Keys
from broker.log import EventLog
from broker.models import END_EVENT, Event, Job, RunStatus
from broker.queue import RunQueue
from broker.runs import RunStore
from broker.settings import Settings
from broker.threads import ThreadStore
from producer.publisher import Publisher
from producer.runner import GraphRun

log = logging.getLogger("tokenrelay.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Claims queued runs and executes each as an asyncio task."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        registry: GraphRegistry,
        *,
        worker_id: str | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.id = worker_id or new_worker_id()
        self.settings = settings
        self.registry = registry
        self.concurrency = concurrency or settings.worker_concurrency
        keys = Keys(settings.key_prefix)
        self._redis = redis
        self.log = EventLog(
            redis, keys, maxlen=settings.stream_maxlen, ttl_seconds=settings.retention_seconds
        )
        self.runs = RunStore(redis, keys, ttl_seconds=settings.retention_seconds)
        self.threads = ThreadStore(redis, keys)
        self.queue = RunQueue(redis, keys)
        self.publisher = Publisher(
            redis, self.log, flush_ms=settings.flush_ms, max_events=settings.flush_max_events
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, stop: asyncio.Event) -> None:
        """Claim and run jobs until `stop` is set, then wait for running jobs to finish."""
        await self.queue.ensure_group()
        self.publisher.start()
        log.info("worker %s ready (concurrency %d)", self.id, self.concurrency)
        try:
            await self._claim_loop(stop)
            if self._tasks:
                await asyncio.wait(self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            await self.publisher.stop()

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            free = self.concurrency - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                claimed = await self.queue.claim(self.id, min(free, 32), block_ms=500)
                backoff = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("cannot claim runs, retrying in %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for msg_id, job in claimed:
                task = asyncio.create_task(self._execute(msg_id, job), name=f"run-{job.run_id}")
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("run task failed", exc_info=task.exception())

    async def _execute(self, msg_id: bytes, job: Job) -> None:
        try:
            run = await self.runs.get(job.run_id)
        except RunNotFound:
            await self.queue.ack(msg_id)
            return
        if run.status.terminal:
            await self.queue.ack(msg_id)
            return
        run.attempt = job.attempt
        await self.runs.update(
            run.run_id, status=RunStatus.RUNNING.value, worker=self.id, attempt=job.attempt
        )
        rid = run.run_id
        self.publisher.begin_run(rid, job.attempt, run.seq)
        self.publisher.emit(
            rid, Event("metadata", codec.json_bytes({"run_id": rid, "attempt": job.attempt}))
        )
        status = RunStatus.SUCCESS
        final: list[Event] = []
        try:
            graph_run = GraphRun(self.registry, run)
            async for event in graph_run.events():
                self.publisher.emit(rid, event)
        except Exception as exc:  # the run failed; the worker goes on
            log.info("run %s failed: %s: %s", rid, type(exc).__name__, exc)
            status = RunStatus.ERROR
            final.append(Event("error", codec.error_payload(type(exc).__name__, str(exc))))
            await self.runs.update(rid, error=f"{type(exc).__name__}: {exc}")
        await self.publisher.flush_run(rid)
        await self.threads.set_status(
            run.thread_id, "error" if status is RunStatus.ERROR else "idle"
        )
        await self.runs.release_active(run.thread_id, rid)
        await self.publisher.close_run(rid, [*final, Event(END_EVENT, b"")], status)
        await self.queue.ack(msg_id)
