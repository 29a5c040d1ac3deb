"""The worker: claims runs from the queue and executes them, up to a concurrency bound.

A worker owns a run while it renews the run's queue entry (its lease) on every heartbeat. When a
worker dies, its entries go idle; after `lease_seconds` any other worker takes them over with
XAUTOCLAIM and starts the next attempt, which continues from the run's last checkpoint. A
superseded worker's writes are fenced off by the append script.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import uuid
from dataclasses import dataclass

from redis.exceptions import ResponseError

from broker import codec, telemetry
from broker.cancel import CancelAction
from broker.connection import NETWORK_ERRORS, RedisClient
from broker.errors import AssistantNotFound
from broker.graphs import GraphRegistry
from broker.keys import Keys
from broker.log import FENCED, EventLog
from broker.models import END_EVENT, LIFECYCLE_EVENT, Event, Job, RunStatus
from broker.pubsub import subscriber
from broker.queue import RunQueue
from broker.runs import RunStore
from broker.settings import Settings
from broker.threads import ThreadStore
from producer.publisher import Publisher
from producer.runner import GraphRun

log = logging.getLogger("tokenrelay.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Running:
    job: Job
    msg_id: bytes
    task: asyncio.Task[None]
    stop_reason: str = ""
    """Why the task is being cancelled: ``handback`` (drain) or ``fenced`` (superseded)."""


class Worker:
    """Claims queued runs and executes each as an asyncio task."""

    def __init__(
        self,
        redis: RedisClient,
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
        self.keys = Keys(settings.key_prefix)
        self._redis = redis
        self.log = EventLog(
            redis, self.keys, maxlen=settings.stream_maxlen, ttl_seconds=settings.retention_seconds
        )
        self.runs = RunStore(redis, self.keys, ttl_seconds=settings.retention_seconds)
        self.threads = ThreadStore(redis, self.keys)
        self.queue = RunQueue(redis, self.keys)
        self.publisher = Publisher(
            redis,
            self.log,
            flush_ms=settings.flush_ms,
            max_events=settings.flush_max_events,
            on_cancel=self._on_cancel_signal,
        )
        self._running: dict[str, _Running] = {}
        self._ctx = {"worker_id": self.id}

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, force: asyncio.Event | None = None) -> None:
        """Claim and run jobs until `stop` is set; then drain: let running runs finish within
        the grace period (or until `force` is set) and hand back the rest."""
        force = force or asyncio.Event()
        await self._connect_with_retry()
        await self._warn_if_memory_shared()
        self.publisher.start()
        beat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        control = asyncio.create_task(self._control_loop(), name="worker-control")
        log.info("worker ready (concurrency %d)", self.concurrency, extra=self._ctx)
        try:
            claim = asyncio.create_task(self._claim_loop(stop))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({claim, stopped}, return_when=asyncio.FIRST_COMPLETED)
            claim.cancel()
            stopped.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim
            await self._drain(force)
        finally:
            for task in (beat, control):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for running in list(self._running.values()):
                running.task.cancel()
            await self.publisher.stop()
            with contextlib.suppress(*NETWORK_ERRORS):
                await self._redis.delete(self.keys.worker(self.id))
            log.info("worker stopped", extra=self._ctx)

    async def _connect_with_retry(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self.queue.ensure_group()
                return
            except NETWORK_ERRORS as exc:
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _warn_if_memory_shared(self) -> None:
        if self.settings.checkpointer != "memory":
            return
        others = [k async for k in self._redis.scan_iter(match=self.keys.worker("*"), count=100)]
        if others:
            log.warning(
                "TOKENRELAY_CHECKPOINTER=memory with %d other live worker(s): each worker keeps "
                "its own in-memory threads, so thread state is not shared and a run taken over "
                "by another worker restarts from scratch. Multi-worker deployments need "
                "TOKENRELAY_CHECKPOINTER=postgresql://...",
                len(others),
                extra=self._ctx,
            )

    async def _drain(self, force: asyncio.Event) -> None:
        if not self._running:
            return
        grace = self.settings.shutdown_grace_seconds
        log.info("draining %d run(s) for up to %.0fs", len(self._running), grace, extra=self._ctx)
        runs_done = asyncio.ensure_future(asyncio.wait({r.task for r in self._running.values()}))
        forced = asyncio.ensure_future(force.wait())
        await asyncio.wait({runs_done, forced}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        runs_done.cancel()
        forced.cancel()
        left = list(self._running.values())
        for running in left:
            running.stop_reason = "handback"
            running.task.cancel()
        if left:
            await asyncio.wait({r.task for r in left}, timeout=10)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                await asyncio.wait(
                    {r.task for r in self._running.values()}, return_when=asyncio.FIRST_COMPLETED
                )
                continue
            try:
                claimed = await self.queue.claim(self.id, min(free, 32), block_ms=500)
                backoff = 0.1
            except NETWORK_ERRORS as exc:
                log.warning("cannot claim runs (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis came back empty (restarted without persistence): recreate the group.
                log.warning("run queue group missing; recreating it", extra=self._ctx)
                await self.queue.ensure_group()
                continue
            for msg_id, job in claimed:
                self._start(msg_id, job)

    def _start(self, msg_id: bytes, job: Job) -> None:
        if job.run_id in self._running:
            return
        task = asyncio.create_task(self._execute(msg_id, job), name=f"run-{job.run_id}")
        self._running[job.run_id] = _Running(job, msg_id, task)
        telemetry.RUNS_ACTIVE.inc()
        task.add_done_callback(functools.partial(self._done, job.run_id))

    def _done(self, run_id: str, task: asyncio.Task[None]) -> None:
        running = self._running.get(run_id)
        if running is not None and running.task is task:
            del self._running[run_id]
            telemetry.RUNS_ACTIVE.dec()
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "run task failed", exc_info=task.exception(), extra={**self._ctx, "run_id": run_id}
            )

    # -- leases ------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        lease = self.settings.lease_seconds
        while True:
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a heartbeat must never stop for good
                log.warning("heartbeat failed: %s", exc, extra=self._ctx)
            await asyncio.sleep(lease / 3)

    async def _heartbeat(self) -> None:
        lease = self.settings.lease_seconds
        await self._redis.set(self.keys.worker(self.id), b"1", ex=max(1, math.ceil(lease)))
        await self.queue.renew(self.id, [r.msg_id for r in self._running.values()])
        free = self.concurrency - len(self._running)
        if free > 0:
            reclaimed = await self.queue.reclaim(self.id, int(lease * 1000), free)
            for msg_id, job in reclaimed:
                if job.run_id in self._running:
                    continue
                telemetry.RUNS_RECLAIMED.inc()
                log.info(
                    "taking over run from a worker whose lease lapsed",
                    extra={**self._ctx, "run_id": job.run_id, "thread_id": job.thread_id},
                )
                self._start(msg_id, job)

    async def _control_loop(self) -> None:
        """Cancel requests sent to this worker (``tr:ctl:<worker>``), acted on at once."""
        while True:
            pubsub = subscriber(self._redis, ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.ctl(self.id))
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    try:
                        body = codec.unpack(msg["data"])
                        self._cancel(str(body["run_id"]), CancelAction(body["action"]))
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignoring a malformed control message", extra=self._ctx)
            except NETWORK_ERRORS as exc:
                log.warning("control channel lost (%s); resubscribing", exc, extra=self._ctx)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(*NETWORK_ERRORS):
                    await pubsub.aclose()

    def _cancel(self, run_id: str, action: CancelAction) -> None:
        running = self._running.get(run_id)
        if running is None or running.stop_reason:
            return
        log.info("cancel requested: %s", action.value, extra={**self._ctx, "run_id": run_id})
        running.stop_reason = f"cancel:{action.value}"
        running.task.cancel()

    def _on_cancel_signal(self, run_id: str, value: bytes) -> None:
        running = self._running.get(run_id)
        if running is None:
            return
        if value in (b"interrupt", b"rollback"):
            self._cancel(run_id, CancelAction(value.decode()))
            return
        if value == FENCED and not running.stop_reason:
            log.warning(
                "run was taken over by another worker; stopping this attempt",
                extra={**self._ctx, "run_id": run_id},
            )
            running.stop_reason = "fenced"
            running.task.cancel()

    # -- executing ---------------------------------------------------------------------------

    async def _execute(self, msg_id: bytes, job: Job) -> None:
        rid = job.run_id
        ctx: dict[str, object] = {**self._ctx, "run_id": rid, "thread_id": job.thread_id}
        verdict, attempt, seq = await self.runs.start_attempt(
            rid, self.id, self.settings.max_attempts
        )
        if verdict == "done":
            await self.queue.ack(msg_id)
            return
        ctx["attempt"] = attempt
        self.publisher.begin_run(rid, attempt, seq)
        # Number the run's events after the thread's last one, then tell the thread's
        # protocol subscribers that a run started.
        await self.runs.assign_seq_base(rid, await self.threads.last_seq(job.thread_id))
        await self.threads.announce_run(job.thread_id)
        if verdict.startswith("cancel:"):
            # Cancelled while it waited in the queue: nothing ran, so nothing to keep.
            await self._cancelled(msg_id, job, CancelAction(verdict.split(":", 1)[1]), None, ctx)
            return
        if verdict == "exhausted":
            log.error("run gave up after %d attempts", attempt, extra=ctx)
            message = f"Run failed after {attempt} attempt(s): its worker stopped responding"
            await self._finish(
                msg_id, job, RunStatus.ERROR, [Event("error", codec.error_payload(
                    "RunAttemptsExhausted", message))], error=message,
            )  # fmt: skip
            return
        telemetry.RUNS_STARTED.inc()
        log.info("run started", extra=ctx)
        self.publisher.emit(
            rid, Event("metadata", codec.json_bytes({"run_id": rid, "attempt": attempt}))
        )
        if attempt == 1:
            try:
                graph_name = self.registry.graph_id(job.assistant_id)
            except AssistantNotFound:
                graph_name = job.assistant_id  # the run fails below, with its error event
            started = {"event": "running", "graph_name": graph_name, "run_id": rid}
            self.publisher.emit(rid, Event(LIFECYCLE_EVENT, codec.json_bytes(started)))
        status = RunStatus.SUCCESS
        final: list[Event] = []
        error = ""
        graph_run: GraphRun | None = None
        try:
            run = await self.runs.get(rid)
            graph_run = GraphRun(self.registry, run)
            await graph_run.prepare()
            async for event in graph_run.events():
                self.publisher.emit(rid, event)
        except asyncio.CancelledError:
            running = self._running.get(rid)
            reason = running.stop_reason if running else ""
            if reason.startswith("cancel:"):
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                action = CancelAction(reason.split(":", 1)[1])
                await self._cancelled(msg_id, job, action, graph_run, ctx)
                return
            await self._stopped(msg_id, job, ctx)
            raise
        except Exception as exc:  # the run failed; the worker goes on
            log.error("run failed: %s: %s", type(exc).__name__, exc, exc_info=exc, extra=ctx)
            status = RunStatus.ERROR
            error = f"{type(exc).__name__}: {exc}"
            final.append(Event("error", codec.error_payload(type(exc).__name__, str(exc))))
        interrupted = graph_run is not None and graph_run.interrupted
        await self._finish(msg_id, job, status, final, error=error, interrupted=interrupted)
        log.info("run finished: %s", status.value, extra=ctx)

    async def _cancelled(
        self,
        msg_id: bytes,
        job: Job,
        action: CancelAction,
        graph_run: GraphRun | None,
        ctx: dict[str, object],
    ) -> None:
        """End a cancelled run: keep its partial output (interrupt) or undo it (rollback)."""
        rid = job.run_id
        final: list[Event] = []
        error = ""
        checkpoint_id: str | None = None
        try:
            if graph_run is not None and action is CancelAction.INTERRUPT:
                checkpoint_id, values = await graph_run.save_partial()
                if checkpoint_id:
                    await self.runs.update(rid, checkpoint_id=checkpoint_id)
                final.append(Event("values", codec.json_bytes(values)))
            elif graph_run is not None:
                await graph_run.rollback()
        except Exception as exc:  # the run still ends; the error says what was not kept
            log.exception("could not %s the cancelled run", action.value, extra=ctx)
            error = f"{type(exc).__name__}: {exc}"
            final.append(Event("error", codec.error_payload(type(exc).__name__, str(exc))))
        await self._finish(
            msg_id, job, RunStatus.INTERRUPTED, final, error=error, checkpoint_id=checkpoint_id
        )
        if action is CancelAction.ROLLBACK:
            await self.runs.delete(await self.runs.get(rid))
        log.info("run cancelled (%s)", action.value, extra=ctx)

    async def _finish(
        self,
        msg_id: bytes,
        job: Job,
        status: RunStatus,
        final: list[Event],
        *,
        error: str = "",
        interrupted: bool = False,
        checkpoint_id: str | None = None,
    ) -> None:
        """Write the run's terminal state: pending events, thread status, the active pointer,
        then the last events and `end` with the final status in one append, then acknowledge
        the job."""
        rid = job.run_id
        if error:
            await self.runs.update(rid, error=error)
            telemetry.RUNS_FAILED.inc()
        final = [*final, _lifecycle_end(status, error, interrupted, checkpoint_id)]
        final.append(Event(END_EVENT, b""))
        await self.publisher.flush_run(rid)
        # The thread's next run numbers its events after this one's last (`end`).
        await self.threads.advance_seq(job.thread_id, await self.runs.last_seq(rid) + len(final))
        await self.threads.set_status(
            job.thread_id, "error" if status is RunStatus.ERROR else "idle"
        )
        promoted = await self.runs.release_active(job.thread_id, rid)
        await self.publisher.close_run(rid, final, status)
        await self.queue.ack(msg_id)
        telemetry.RUNS_FINISHED.labels(status.value).inc()
        if promoted:
            # The next run queued on this thread (multitask enqueue) may start now.
            await self.queue.enqueue(self.runs.job(await self.runs.get(promoted)))

    async def _stopped(self, msg_id: bytes, job: Job, ctx: dict[str, object]) -> None:
        """The run's task was cancelled: hand it back to the queue, or let it go if fenced."""
        running = self._running.get(job.run_id)
        reason = running.stop_reason if running else ""
        if reason == "fenced":
            self.publisher.forget(job.run_id)
            return
        if reason == "handback":
            # What was published stays; the next attempt continues from the last checkpoint.
            await self.publisher.flush_run(job.run_id)
            self.publisher.forget(job.run_id)
            await self.runs.update(job.run_id, status=RunStatus.PENDING.value, worker="")
            await self.queue.enqueue(job)
            await self.queue.ack(msg_id)
            telemetry.RUNS_HANDED_BACK.inc()
            log.info("run handed back to the queue", extra=ctx)


def _lifecycle_end(
    status: RunStatus, error: str, interrupted: bool, checkpoint_id: str | None
) -> Event:
    """The protocol's last root lifecycle event of a run; a cancel names the checkpoint that
    kept its partial output."""
    data: dict[str, object]
    if status is RunStatus.ERROR or (error and status is not RunStatus.INTERRUPTED):
        data = {"event": "failed", "error": error}
    elif status is RunStatus.INTERRUPTED or interrupted:
        data = {"event": "interrupted"}
        if checkpoint_id:
            data["checkpoint"] = {"id": checkpoint_id}
    else:
        data = {"event": "completed"}
    return Event(LIFECYCLE_EVENT, codec.json_bytes(data))
