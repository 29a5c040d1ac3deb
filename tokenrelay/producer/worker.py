"""The worker: claims runs from the queue and executes them, up to a concurrency bound.

A worker owns a run while it renews the run's queue entry (its lease) on every heartbeat. When a
worker dies, its entries go idle; after `lease_seconds` any other worker takes them over with
XAUTOCLAIM and starts the next attempt, which continues from the run's last checkpoint.

Fencing: every write an attempt makes for its run is conditional on it still being the run's
current attempt (appends and the final status by the append script, other fields by
``update_run.lua``, the lease and the queue ack by the queue entry's owner). The end of a run is
written first, in one fenced append; once it is in, no other attempt can start, so the
thread-side effects that follow (thread status, releasing the active pointer, the ack) belong to
the attempt that wrote it. A superseded attempt stops its graph at its next write or lease
renewal and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.exceptions import ResponseError

from tokenrelay.broker import codec, telemetry
from tokenrelay.broker.cancel import CancelAction
from tokenrelay.broker.connection import NETWORK_ERRORS, RedisClient, in_order
from tokenrelay.broker.errors import AppendFailed, AssistantNotFound, Superseded, ThreadNotFound
from tokenrelay.broker.graphs import GraphRegistry
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.log import FENCED, EventLog
from tokenrelay.broker.models import (
    END_EVENT,
    LAST_ID,
    LIFECYCLE_EVENT,
    Entry,
    Event,
    Job,
    RunStatus,
)
from tokenrelay.broker.pubsub import subscriber
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.retry import Backoff, is_transient
from tokenrelay.broker.runs import RunStore, new_id, now_ms
from tokenrelay.broker.runtime import cancel_and_wait
from tokenrelay.broker.scripts import AnyPipeline, RoundTrip, in_sequence
from tokenrelay.broker.settings import Settings
from tokenrelay.broker.threads import ThreadStore
from tokenrelay.producer.publisher import Publisher
from tokenrelay.producer.runner import GraphRun

log = logging.getLogger("tokenrelay.worker")

END_TRIES = 30
"""Tries at writing a run's end while Redis refuses its appends (about a minute), each after
the publisher's own bounded retries."""

REDIS_STEP_TRIES = 30
"""Tries at each step of an attempt's setup, or of what follows a run's end, while Redis is
down or restarting (about a minute with the backoff's 2 s cap). Past them the task gives up:
a setup leaves the run to its lease, an end's aftermath to the thread's repair."""
CANCEL_REDELIVERY_SECONDS = 5.0
"""A cancel is delivered to a run's task again at most this often while the graph, which has
produced nothing since, has not ended (see `_Running.deliver_cancel`)."""

OWNERSHIP_FRESH_SECONDS = 0.5
"""How old an ownership check may be for a cancelled run to write its thread on its answer:
LangGraph unwinds a cancel in milliseconds, but a graph that swallows the cancel takes the one
delivered again, seconds later, and a lease lost meanwhile must not go unseen."""

STARTED_KEPT = 16_384
"""How many of the jobs it started a worker remembers (`Worker._started`): one it started and
holds unrenewed (its task ended before its acknowledgement landed) is taken over once its lease
lapses, within a lease or two, long before this many more runs have started."""

PROMOTE_SECONDS = 0.5
"""How often a worker queues the runs put off (`after_seconds`) that are due: a run starts
within about this long after its time, and an idle worker reads the set twice a second."""

T = TypeVar("T")


def _answer_taken(task: asyncio.Task[Any]) -> None:
    """Take a side task's outcome, so that one nobody awaited (its run ended another way) is
    not reported as an exception never retrieved."""
    if not task.cancelled():
        task.exception()


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Running:
    job: Job
    msg_id: bytes
    task: asyncio.Task[None]
    stop_reason: str = ""
    """Why the task is being cancelled: ``handback`` (drain), ``fenced`` (superseded),
    ``failed`` (Redis refuses its events) or ``cancel:<action>``."""
    attempt: int = 0
    failure: str = ""
    finishing: bool = False
    """Writing the run's end: nothing may cancel the task any more (a superseded or failed
    write raises in the task itself)."""
    stopping: bool = False
    """The task took its cancellation and is ending the run (saving its partial output)."""
    in_graph: bool = False
    """The graph has started: a cancel is delivered to the task. Before, it is only recorded
    (`stop_reason`) and acted on when the graph would start, so a cancel that lands while the
    attempt is being set up cannot cut that short and leave the run running."""
    events: int = 0
    """Events the graph has produced so far."""
    cancelled: tuple[int, float] = (-1, 0.0)
    """`events` and the monotonic time when the cancel was last delivered to the task."""
    ownership: tuple[asyncio.Task[bool], float] | None = None
    """The cancelled attempt's ownership check (`RunStore.update_fenced`) and the monotonic
    time it was sent: started as the cancel is first delivered, so that its round trip overlaps
    LangGraph's unwinding of the graph (some twenty turns of the event loop); `Worker._cancelled`
    takes its answer while it is fresh (`OWNERSHIP_FRESH_SECONDS`)."""

    def deliver_cancel(self) -> None:
        """Cancel the task, unless it is still unwinding the cancel delivered before.

        A cancel is asked for again by every flush (which reads the durable request) and by
        every repeated stop. Delivered again while LangGraph unwinds the first one, it would
        cancel the task that writes the graph's last checkpoints, and the partial output would
        be saved on top of a thread missing the run's input. So it is delivered again only
        when the graph has gone on producing events since (code inside it swallowed the
        cancellation), or after `CANCEL_REDELIVERY_SECONDS` without an end."""
        events, at = self.cancelled
        now = time.monotonic()
        if events >= 0 and self.events == events and now - at < CANCEL_REDELIVERY_SECONDS:
            return
        self.cancelled = (self.events, now)
        self.task.cancel()


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
            on_failed=self._on_append_failed,
        )
        self._running: dict[str, _Running] = {}
        self._started: dict[bytes, None] = {}
        """The jobs this worker started, latest last (at most `STARTED_KEPT`): a job it holds
        and did not start is a stray (`Worker._adopt`); one it started and holds unrenewed is
        left for a takeover, as a new attempt."""
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
            stopped.cancel()
            await cancel_and_wait(claim)
            failure = None if claim.cancelled() else claim.exception()
            if failure is not None:
                raise failure
            await self._drain(force)
        finally:
            # Cancelled again should a Redis call swallow the cancellation, so the worker stops.
            for task in (beat, control):
                await cancel_and_wait(task)
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
            if running.in_graph:
                running.task.cancel()
            # Otherwise the attempt is being set up: cut short there it would leave its job
            # to the lease; it hands the run back itself when the graph would start.
        if left:
            await asyncio.wait({r.task for r in left}, timeout=10)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        promoted_at = -float("inf")
        while not stop.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                await asyncio.wait(
                    {r.task for r in self._running.values()}, return_when=asyncio.FIRST_COMPLETED
                )
                continue
            try:
                if loop.time() - promoted_at >= PROMOTE_SECONDS:
                    promoted_at = loop.time()
                    await self.queue.promote_due()
                claimed = await self.queue.claim(self.id, min(free, 32), block_ms=500)
                backoff = 0.1
            except NETWORK_ERRORS as exc:
                log.warning("cannot claim runs (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                # The queue or its group vanished (DEL, FLUSHALL, a restart without
                # persistence): recreate them and go on.
                log.warning("run queue or its group missing; recreating them", extra=self._ctx)
                with contextlib.suppress(*NETWORK_ERRORS, ResponseError):
                    await self.queue.ensure_group()
                await asyncio.sleep(backoff)
                continue
            for msg_id, job in claimed:
                self._start(msg_id, job)

    def _start(self, msg_id: bytes, job: Job) -> None:
        # Known from here, started or not: a second job of a run already running is left to a
        # takeover once its lease lapses (`start_attempt` then finds nothing to do), not taken
        # for a stray at every heartbeat.
        self._started[msg_id] = None
        if len(self._started) > STARTED_KEPT:
            del self._started[next(iter(self._started))]
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
        await self.runs.data_since()  # marks when an emptied Redis began to hold data again
        owned = {r.msg_id: r for r in self._running.values() if not r.stop_reason}
        stray_ms = int(lease * 1000 / 3)
        lost, strays = await self.queue.renew(self.id, list(owned), stray_ms)
        for msg_id in lost:
            running = owned[msg_id]
            self._fence(running.job.run_id, "its job was taken over by another worker or deleted")
        # Within the worker's concurrency: the rest are left to a takeover after their lease.
        free = max(0, self.concurrency - len(self._running))
        await self._adopt([m for m in strays if m not in self._started][:free], stray_ms)
        # The lease clock is read at every heartbeat, with no room too (count 0): a gap in its
        # readings means no worker could reach Redis. Heartbeats come every third of a lease,
        # so half a lease without a reading is a stall.
        free = max(0, self.concurrency - len(self._running))
        try:
            reclaimed = await self.queue.reclaim(
                self.id, int(lease * 1000), free, stall_ms=int(lease * 500)
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.queue.ensure_group()
            return
        for msg_id, job in reclaimed:
            if job.run_id in self._running:
                continue
            telemetry.RUNS_RECLAIMED.inc()
            log.info(
                "taking over run from a worker whose lease lapsed",
                extra={**self._ctx, "run_id": job.run_id, "thread_id": job.thread_id},
            )
            self._start(msg_id, job)

    async def _adopt(self, strays: list[bytes], min_idle_ms: int) -> None:
        """Start the jobs Redis handed this worker that it never received: a read of the queue
        that delivered them while its connection was being cut (a partition, a proxy's reset)
        lost its reply, and redis-py's resend of the read finds nothing new. Without this they
        would wait a whole lease, then run as a second attempt."""
        if not strays:
            return
        for msg_id, job in await self.queue.adopt(self.id, strays, min_idle_ms):
            log.warning(
                "starting a run whose delivery to this worker was lost",
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
        if running is None or running.finishing or running.stopping:
            return
        if running.stop_reason:
            # Asked again (every flush reads the durable cancel request) while the task has
            # not taken its cancellation: code inside the graph swallowed it; deliver it again.
            if running.stop_reason.startswith("cancel:") and running.in_graph:
                running.deliver_cancel()
            return
        log.info("cancel requested: %s", action.value, extra={**self._ctx, "run_id": run_id})
        running.stop_reason = f"cancel:{action.value}"
        if running.in_graph:
            check = asyncio.create_task(self.runs.update_fenced(run_id, running.attempt))
            check.add_done_callback(_answer_taken)
            running.ownership = (check, time.monotonic())
            running.deliver_cancel()

    def _on_cancel_signal(self, run_id: str, value: bytes) -> None:
        running = self._running.get(run_id)
        if running is None:
            return
        if value in (b"interrupt", b"rollback"):
            self._cancel(run_id, CancelAction(value.decode()))
            return
        if value == FENCED:
            self._fence(run_id, "another attempt owns its stream")

    def _fence(self, run_id: str, why: str) -> None:
        """This worker's attempt was superseded: stop its graph, write nothing more."""
        running = self._running.get(run_id)
        if running is None or running.finishing or running.stop_reason in ("fenced", "handback"):
            return
        log.warning(
            "run was taken over by another worker (%s); stopping attempt %d, writing nothing more",
            why, running.attempt, extra={**self._ctx, "run_id": run_id},
        )  # fmt: skip
        running.stop_reason = "fenced"
        running.task.cancel()

    def _on_append_failed(self, run_id: str, exc: BaseException) -> None:
        running = self._running.get(run_id)
        if running is None or running.stop_reason or running.finishing:
            return
        running.stop_reason = "failed"
        running.failure = str(exc)
        running.task.cancel()

    # -- executing ---------------------------------------------------------------------------

    async def _execute(self, msg_id: bytes, job: Job) -> None:
        rid = job.run_id
        ctx: dict[str, object] = {**self._ctx, "run_id": rid, "thread_id": job.thread_id}
        (verdict, attempt, seq), after = await self._redis_step(
            lambda: self._begin(msg_id, job), ctx
        )
        if verdict == "done":
            await self.queue.ack(msg_id, self.id)
            return
        ctx["attempt"] = attempt
        running = self._running.get(rid)
        if running is not None:
            running.attempt = attempt
        self.publisher.begin_run(rid, attempt, seq)
        meta = await self._redis_step(lambda: self._number(job, after), ctx)
        try:
            if verdict.startswith("cancel:"):
                # Cancelled while it waited in the queue: this attempt ran nothing; an earlier
                # one may have (its worker stopped), and what it streamed is kept.
                action = CancelAction(verdict.split(":", 1)[1])
                await self._cancelled(msg_id, job, attempt, action, None, ctx, meta=meta)
                return
            if verdict == "exhausted":
                log.error("run gave up after %d attempts", attempt - 1, extra=ctx)
                tries = attempt - 1
                message = f"Run failed after {tries} attempt(s): its worker stopped responding"
                await self._finish(
                    msg_id, job, attempt, RunStatus.ERROR, [Event("error", codec.error_payload(
                        "RunAttemptsExhausted", message))], error=message, ctx=ctx,
                )  # fmt: skip
                return
            await self._run_graph(msg_id, job, attempt, meta, ctx)
        except Superseded:
            self.publisher.forget(rid)
            log.warning("attempt superseded; it wrote nothing more", extra=ctx)

    async def _begin(self, msg_id: bytes, job: Job) -> tuple[tuple[str, int, int], int]:
        """Start the run's next attempt (`RunStore.start_attempt`) and read the thread's last
        seq, which its events are numbered after, in one round trip."""
        trip = RoundTrip(self._redis)
        at = self.runs.start_attempt_in(trip, job.run_id, self.id, self.settings.max_attempts,
                                        msg_id)  # fmt: skip
        self.threads.last_seq_in(trip.pipe, job.thread_id)
        replies = await trip.execute()
        return RunStore.attempt_of(replies[at]), int(replies[at + 1] or 0)

    async def _number(self, job: Job, after: int) -> dict[bytes, bytes]:
        """Number the run's events after `after` (the thread's last seq), read the run as it
        now stands and tell the thread's protocol subscribers that a run started: one round
        trip where one server applies it in order (a subscriber woken must find the run
        numbered); on a cluster the announcement follows in one of its own."""

        def number(pipe: AnyPipeline) -> None:
            self.runs.assign_seq_base_in(pipe, job.run_id, after)
            self.runs.get_in(pipe, job.run_id)

        replies, _ = await in_sequence(
            self._redis, number, lambda pipe: self.threads.announce_run_in(pipe, job.thread_id)
        )
        return cast(dict[bytes, bytes], replies[-1])  # the read, queued last

    async def _redis_step(
        self, step: Callable[[], Awaitable[T]], ctx: dict[str, object], doing: str = "starting"
    ) -> T:
        """One step of a run's start or of what follows its end, retried (bounded) while Redis
        is down or restarting: a Redis that comes back within a minute costs the run that time,
        not the run. A step may land twice (its reply lost, by redis-py's own resend or by a try
        here): each answers as it did the first time. Starting the attempt of a job its worker
        already started gives that attempt again; a release sent again with its token gives the
        run it promoted; the other steps read, or write what they wrote."""
        backoff = Backoff()
        while True:
            try:
                return await step()
            except Exception as exc:
                if not is_transient(exc) or backoff.tries >= REDIS_STEP_TRIES:
                    raise
                delay = backoff.next_delay()
                log.warning("redis unavailable while %s the run (%s); retrying in %.2fs",
                            doing, exc, delay, extra=ctx)  # fmt: skip
                await asyncio.sleep(delay)

    async def _run_graph(
        self, msg_id: bytes, job: Job, attempt: int, meta: dict[bytes, bytes],
        ctx: dict[str, object],
    ) -> None:  # fmt: skip
        """Run the graph of `job`, whose run hash was read as `meta` once its attempt began."""
        rid = job.run_id
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
        running = self._running.get(rid)
        if running is not None:
            # From here a cancel is delivered to the task; one asked for meanwhile is acted on
            # now (no await since the check, so none can slip between).
            running.in_graph = True
            if running.stop_reason.startswith("cancel:"):
                running.stopping = True
                action = CancelAction(running.stop_reason.split(":", 1)[1])
                await self._cancelled(msg_id, job, attempt, action, None, ctx, meta=meta)
                return
            if running.stop_reason == "handback":  # the worker drained while it was set up
                await self._stopped(msg_id, job, attempt, ctx)
                return
        try:
            run = RunStore.record(rid, meta)
            graph_run = GraphRun(self.registry, run)
            await graph_run.prepare()
            async for event in graph_run.events():
                self.publisher.emit(rid, event)
                if running is not None:
                    running.events += 1
        except asyncio.CancelledError:
            running = self._running.get(rid)
            reason = running.stop_reason if running else ""
            if running is not None:
                running.stopping = True
            if reason.startswith("cancel:") or reason == "failed":
                # Every cancel delivered is taken here (a swallowed one was delivered again), so
                # none is left pending to turn a timeout in what follows into a cancellation.
                task = asyncio.current_task()
                while task is not None and task.cancelling():
                    task.uncancel()
            if reason.startswith("cancel:"):
                action = CancelAction(reason.split(":", 1)[1])
                await self._cancelled(msg_id, job, attempt, action, graph_run, ctx)
                return
            if reason == "failed":
                assert running is not None
                await self._failed(msg_id, job, attempt, running.failure, ctx)
                return
            await self._stopped(msg_id, job, attempt, ctx)
            raise
        except Exception as exc:  # the run failed; the worker goes on
            log.error("run failed: %s: %s", type(exc).__name__, exc, exc_info=exc, extra=ctx)
            status = RunStatus.ERROR
            error = f"{type(exc).__name__}: {exc}"
            final.append(Event("error", codec.error_payload(type(exc).__name__, str(exc))))
        interrupted = graph_run is not None and graph_run.interrupted
        if await self._finish(
            msg_id, job, attempt, status, final, error=error, ctx=ctx, interrupted=interrupted
        ):
            log.info("run finished: %s", status.value, extra=ctx)

    async def _cancelled(
        self,
        msg_id: bytes,
        job: Job,
        attempt: int,
        action: CancelAction,
        graph_run: GraphRun | None,
        ctx: dict[str, object],
        *,
        meta: dict[bytes, bytes] | None = None,
    ) -> None:
        """End a cancelled run: keep its partial output (interrupt) or undo it (rollback).

        `graph_run` is None when this attempt's graph did not start; `meta` is then the run's
        hash. An attempt past the first that streamed no message yet ends what the earlier ones
        did: it keeps the partial message the last of them streamed (from the run's stored
        events), or undoes the checkpoints they wrote."""
        rid = job.run_id
        final: list[Event] = []
        error = ""
        checkpoint_id: str | None = None
        # The thread is written below: only while this attempt still owns the run.
        if not await self._still_owns(rid, attempt):
            raise Superseded(rid, attempt)
        try:
            if graph_run is None and meta is not None and attempt > 1:
                graph_run = GraphRun(self.registry, RunStore.record(rid, meta))
            if graph_run is not None and action is CancelAction.INTERRUPT:
                if attempt > 1 and not graph_run.streamed:
                    # What its clients saw last is an earlier attempt's partial message.
                    graph_run.replay(await self._stored(rid))
                # The fork checkpoint id is recorded with the run's end, in its one fenced
                # append: a client that sees the end reads the run with it.
                checkpoint_id, values = await graph_run.save_partial()
                final.append(Event("values", codec.json_bytes(values)))
            elif graph_run is not None:
                await graph_run.rollback()
        except Superseded:
            raise
        except Exception as exc:  # the run still ends; the error says what was not kept
            log.exception("could not %s the cancelled run", action.value, extra=ctx)
            error = f"{type(exc).__name__}: {exc}"
            final.append(Event("error", codec.error_payload(type(exc).__name__, str(exc))))
        if not await self._finish(
            msg_id, job, attempt, RunStatus.INTERRUPTED, final, error=error, ctx=ctx,
            checkpoint_id=checkpoint_id,
        ):  # fmt: skip
            return
        if action is CancelAction.ROLLBACK:
            await self.runs.delete(await self.runs.get(rid))
        log.info("run cancelled (%s)", action.value, extra=ctx)

    async def _stored(self, run_id: str) -> list[Entry]:
        """Every event of the run stored so far (what a trim left of them)."""
        out: list[Entry] = []
        async for page in self.log.history(run_id, LAST_ID):
            if isinstance(page, list):
                out.extend(page)
        return out

    async def _still_owns(self, run_id: str, attempt: int) -> bool:
        """Whether `attempt` still owns the run (and its `updated_at` set): the answer of the
        check started when the cancel was delivered, if it was sent less than
        `OWNERSHIP_FRESH_SECONDS` ago, else (none started, a stale one, or it failed) of one
        made now."""
        running = self._running.get(run_id)
        early = running.ownership if running is not None and running.attempt == attempt else None
        if running is not None:
            running.ownership = None
        if early is not None and time.monotonic() - early[1] < OWNERSHIP_FRESH_SECONDS:
            with contextlib.suppress(Exception):
                return await early[0]
        return await self.runs.update_fenced(run_id, attempt)

    async def _failed(
        self, msg_id: bytes, job: Job, attempt: int, why: str, ctx: dict[str, object]
    ) -> None:
        """Redis refused the run's events for good: end it with an error, as far as Redis
        lets us write one."""
        log.error("run failed: Redis refuses its events: %s", why, extra=ctx)
        self.publisher.revive(job.run_id)
        message = f"Redis refused the run's events: {why}"
        error = [Event("error", codec.error_payload("AppendFailed", message))]
        await self._finish(msg_id, job, attempt, RunStatus.ERROR, error, error=message, ctx=ctx)

    async def _finish(
        self,
        msg_id: bytes,
        job: Job,
        attempt: int,
        status: RunStatus,
        final: list[Event],
        *,
        error: str = "",
        ctx: dict[str, object],
        interrupted: bool = False,
        checkpoint_id: str | None = None,
    ) -> bool:
        """Write the run's terminal state: the final events, `end` and the final status in one
        fenced append, then the thread's status and active pointer, then acknowledge the job.
        Raises `Superseded` (having written nothing) when this attempt was superseded."""
        rid = job.run_id
        running = self._running.get(rid)
        if running is not None:
            running.finishing = True
        if error:
            try:
                if not await self.runs.update_fenced(rid, attempt, error=error):
                    raise Superseded(rid, attempt)
            except Superseded:
                raise
            except Exception as exc:  # Redis refuses writes: the error event still says it
                log.warning("could not record the run's error: %s", exc, extra=ctx)
            telemetry.RUNS_FAILED.inc()
        backoff = Backoff()
        end = _lifecycle_end(status, error, interrupted, checkpoint_id)
        events = [*final, end, Event(END_EVENT, b"")]
        fields = {"checkpoint_id": checkpoint_id} if checkpoint_id else {}
        while True:
            try:
                await self.publisher.close_run(rid, events, status, fields)
                break
            except AppendFailed as exc:
                # Events were lost: the run ends as an error that says so, whatever it was.
                # Redis refuses writes (out of memory, say): try again, bounded, so readers
                # get the end once it takes writes again; then give the run up.
                if status is not RunStatus.ERROR or not error:
                    status = RunStatus.ERROR
                    error = f"AppendFailed: Redis refused the run's events: {exc}"
                    events = [
                        Event("error", codec.error_payload("AppendFailed", error)),
                        _lifecycle_end(status, error, False, None),
                        Event(END_EVENT, b""),
                    ]
                    with contextlib.suppress(Exception):
                        await self.runs.update_fenced(rid, attempt, error=error)
                if backoff.tries >= END_TRIES:
                    log.error("could not write the end of the run, giving up: %s", exc, extra=ctx)
                    break
                delay = backoff.next_delay()
                log.warning("could not write the end of the run, retrying in %.1fs", delay,
                            extra=ctx)  # fmt: skip
                await asyncio.sleep(delay)
                self.publisher.revive(rid)
        # The end is written by this attempt: no other attempt can start the run any more.
        await self._after_end(msg_id, job, status, ctx)
        telemetry.RUNS_FINISHED.labels(status.value).inc()
        return True

    async def _after_end(
        self, msg_id: bytes, job: Job, status: RunStatus, ctx: dict[str, object]
    ) -> None:
        """What follows a run's written end, in three pipelined round trips (and a check
        after), each after the one before has landed:

        1. read the run's last seq and the thread; record the thread's status in the index
           (before the thread can turn idle: the index holds a superset, never a subset);
        2. the thread's seq, then its status, then the release of its active pointer: one
           slot, so Redis applies them in that order, and the thread's next run numbers its
           events after this one's;
        3. once released: the owner-checked queue ack, the thread out of the busy index (none
           promoted), a stateless run's thread retired (its state deleted first); then the
           thread's active pointer, read in the same trip where one server applies it in
           order (on a cluster, in one of its own);
        4. after that: the thread marked busy again if a run claimed it meanwhile; a run
           promoted in the release is enqueued (even if a write of 2 failed).
        """
        tid, rid = job.thread_id, job.run_id
        thread_status = "error" if status is RunStatus.ERROR else "idle"
        ts = now_ms()

        async def read() -> list[Any]:
            reads = self._redis.pipeline(transaction=False)
            self.runs.last_seq_in(reads, rid)
            self.threads.get_in(reads, tid)
            self.threads.index.status_recorded_in(reads, tid, thread_status, ts)
            return await reads.execute()

        last_seq, thread, *_ = await self._redis_step(read, ctx, "ending")

        token = new_id()  # the same in each try of the step: a try that landed is answered again

        async def release() -> tuple[list[Any], int]:
            trip = RoundTrip(self._redis)
            self.threads.advance_seq_in(trip, tid, RunStore.last_seq_of(last_seq))
            self.threads.set_status_in(trip.pipe, tid, thread_status, ts)
            released = self.runs.release_active_in(trip, tid, rid, token)
            return await trip.execute(raise_on_error=False), released

        replies, released = await self._redis_step(release, ctx, "ending")
        promoted: str | None = None
        try:
            if isinstance(replies[released], Exception):
                raise replies[released]
            promoted = RunStore.promoted_of(replies[released])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            try:
                stateless = bool(ThreadStore.record(tid, thread).metadata.get("stateless"))
            except ThreadNotFound:
                stateless = False
            if stateless:
                await self._delete_thread_state(tid, ctx)

            async def done() -> str | None:
                """The trip, and the thread's active pointer read after it (`None` when a run
                was promoted: the thread stays busy)."""
                trip = RoundTrip(self._redis)
                self.queue.ack_in(trip, msg_id, self.id)
                if promoted is None:
                    self.runs.not_busy_in(trip.pipe, tid)
                if stateless:
                    # A stateless run (``POST /runs/...``) leaves no thread behind: its records
                    # expire with the run's.
                    self.threads.retire_in(trip.pipe, tid, self.settings.retention_seconds)
                reads = promoted is None and in_order(self._redis)
                if reads:
                    # Read after the thread left the busy index: Redis applies the trip in order.
                    self.runs.active_pointer_in(trip.pipe, tid)
                replies = await trip.execute()
                if reads:
                    return RunStore.pointer_of(replies[-1])
                # On a cluster, read once the trip has landed.
                return await self.runs.active_pointer(tid) if promoted is None else None

            pointer = await self._redis_step(done, ctx, "ending")
            if promoted is None:
                await self._redis_step(
                    lambda: self.runs.keep_busy_if_unfinished(tid, pointer), ctx, "ending"
                )
        finally:
            if promoted:
                next_run = promoted

                async def enqueue() -> None:
                    # The next run queued on this thread (multitask enqueue) may start now.
                    await self.queue.enqueue(self.runs.job(await self.runs.get(next_run)))

                await self._redis_step(enqueue, ctx, "ending")

    async def _delete_thread_state(self, thread_id: str, ctx: dict[str, object]) -> None:
        """Delete a stateless run's thread state from the checkpointer."""
        saver = self.registry.checkpointer
        if saver is not None:
            try:
                await saver.adelete_thread(thread_id)
            except Exception:  # the records still expire; the state is only kept longer
                log.exception("could not delete a stateless run's thread state", extra=ctx)

    async def _stopped(self, msg_id: bytes, job: Job, attempt: int, ctx: dict[str, object]) -> None:
        """The run's task was cancelled: hand it back to the queue, or let it go if fenced."""
        running = self._running.get(job.run_id)
        reason = running.stop_reason if running else ""
        if reason == "fenced":
            self.publisher.forget(job.run_id)
            log.warning("attempt superseded; its graph stopped", extra=ctx)
            return
        if reason == "handback":
            # What was published stays; the next attempt continues from the last checkpoint.
            with contextlib.suppress(Superseded, AppendFailed):
                await self.publisher.flush_run(job.run_id)
            self.publisher.forget(job.run_id)
            fields = {"status": RunStatus.PENDING.value, "worker": ""}
            if await self.runs.update_fenced(job.run_id, attempt, **fields):
                requeued = await self.queue.enqueue(job)
                # The record names the job that holds the run now (see the thread repair).
                await self.runs.update_fenced(job.run_id, attempt, job=requeued.decode())
                await self.queue.ack(msg_id, self.id)
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
