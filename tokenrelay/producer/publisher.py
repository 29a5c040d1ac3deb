"""Publishes run events to Redis, coalesced.

Events of all runs of a worker are written at most once per short flush window (sooner when a
count bound is reached), in one round trip and one append script call for all its runs (one
per run on a cluster); the first
event after a quiet window is written at once. One append carries at most the count bound of
one run's events; a run that wrote more has the rest written by the next flush, at once. Each
append also returns the run's durable cancel request, so checking for a cancel costs nothing
extra.

Every append carries the run's attempt, so the append script fences off a superseded attempt
(`Superseded` for whoever waits on the write); batches are numbered per attempt, so attempts
never collide in `seq`. Transient Redis errors are retried with backoff for as long as they
last; a write Redis refuses for good fails its run (`AppendFailed`) after bounded retries, and
an unexpected exception fails the runs of that flush instead of stopping the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from redis.exceptions import NoScriptError

from tokenrelay.broker import telemetry
from tokenrelay.broker.connection import RedisClient
from tokenrelay.broker.errors import AppendFailed, Superseded
from tokenrelay.broker.log import (
    FENCED,
    EventLog,
    Row,
    RunAppend,
    blob_kind,
    entry_name,
    stored_blob,
)
from tokenrelay.broker.models import Event, RunStatus
from tokenrelay.broker.retry import PERMANENT_TRIES, Backoff, is_transient
from tokenrelay.broker.runtime import cancel_and_wait

log = logging.getLogger("tokenrelay.publisher")

SEQ_SPAN = 1_000_000_000
"""Batch numbers of attempt `a` are ``a * SEQ_SPAN + n``: a later attempt's always exceed an
earlier one's, so a stray batch of a superseded attempt can never pass for one of its
successor's, or the other way round."""

Reply = bytes | None | BaseException


@dataclass(slots=True)
class _Pending:
    rows: list[Row] = field(default_factory=list)
    blobs: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: RunStatus | None = None
    fields: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    failures: int = 0


class Publisher:
    """Coalesces events of many runs into pipelined append batches."""

    def __init__(
        self,
        redis: RedisClient,
        log_: EventLog,
        *,
        flush_ms: float,
        max_events: int,
        on_cancel: Callable[[str, bytes], None] | None = None,
        on_failed: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._redis = redis
        self._log = log_
        self._flush_s = flush_ms / 1000.0
        self._max_events = max_events
        self._on_cancel = on_cancel
        self._on_failed = on_failed
        self._pending: dict[str, _Pending] = {}
        self._blob_refs: dict[str, dict[tuple[bool, bytes], bytes]] = {}
        self._last_blob: dict[str, tuple[bytes, bool, str, str, bytes]] = {}
        """Per run, its last event's blob (the object), kind and name, and what they were
        stored as: the next event with the same blob object is stored the same."""
        self._seq: dict[str, int] = {}
        self._ref_prefix: dict[str, str] = {}
        self._attempt: dict[str, int] = {}
        self._dead: dict[str, BaseException] = {}
        """Runs whose writes were fenced off or refused for good: nothing more is written."""
        self._count = 0
        self._dirty = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self.events_published = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def stop(self) -> None:
        """Write what is buffered, then stop."""
        if self._task is None:
            return
        if self._pending:
            await self.flush_all()
        await cancel_and_wait(self._task)
        self._task = None

    def emit(self, run_id: str, event: Event) -> None:
        """Buffer `event` for `run_id`; it is written within the flush window."""
        if run_id in self._dead:
            return
        pending = self._pending.get(run_id)
        if pending is None:
            pending = self._pending[run_id] = _Pending()
        ref = b""
        name = event.name
        if event.blob is not None:
            last = self._last_blob.get(run_id)
            if (
                last is not None
                and last[0] is event.blob
                and last[1] == event.content_only
                and last[2] == name
            ):
                # The same blob object as the run's last event's (every chunk of a message
                # shares its encoded invariant part): no copy and no hash of it per token.
                name, ref = last[3], last[4]
            else:
                blob = stored_blob(event)
                refs = self._blob_refs.setdefault(run_id, {})
                key = (event.content_only, blob)
                ref = refs.get(key, b"")
                if not ref:
                    kind = blob_kind(event)
                    ref = kind + f"{self._ref_prefix.get(run_id, '')}{len(refs)}".encode()
                    refs[key] = ref
                    pending.blobs.append((ref, blob))
                stored_name, stored_ref = entry_name(event, ref)
                self._last_blob[run_id] = (
                    event.blob,
                    event.content_only,
                    name,
                    stored_name,
                    stored_ref,
                )
                name, ref = stored_name, stored_ref
        pending.rows.append((name, event.data, ref))
        self._count += 1
        self._dirty.set()
        if self._count >= self._max_events:
            self._urgent.set()

    async def close_run(
        self,
        run_id: str,
        events: list[Event],
        status: RunStatus,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        """Append the last `events` with the final `status` (and other meta `fields`) and wait
        until they are written; raises `Superseded` or `AppendFailed` when they were not."""
        self._raise_if_dead(run_id)
        for event in events:
            self.emit(run_id, event)
        pending = self._pending.setdefault(run_id, _Pending())
        pending.status = status
        pending.fields.update(fields or {})
        try:
            await self._wait(run_id, pending)
        except AppendFailed:
            raise  # the run stays known, so its end can be tried again (`revive`)
        except BaseException:
            self.forget(run_id)
            raise
        self.forget(run_id)

    def revive(self, run_id: str) -> None:
        """Accept writes again for a run whose appends Redis refused, numbered after them."""
        if isinstance(self._dead.get(run_id), AppendFailed):
            del self._dead[run_id]

    async def flush_run(self, run_id: str) -> None:
        """Wait until everything buffered for `run_id` is written (raises as `close_run`)."""
        self._raise_if_dead(run_id)
        pending = self._pending.get(run_id)
        if pending is not None:
            await self._wait(run_id, pending)

    def _raise_if_dead(self, run_id: str) -> None:
        exc = self._dead.get(run_id)
        if exc is not None:
            raise exc

    async def flush_all(self) -> None:
        waits = [self._wait(rid, p) for rid, p in list(self._pending.items())]
        await asyncio.gather(*waits)

    def begin_run(self, run_id: str, attempt: int, applied_seq: int = 0) -> None:
        """Start publishing for a run's `attempt`: its writes are fenced by it, its batches are
        numbered after the ones an earlier attempt wrote and its metadata blobs named apart."""
        self._dead.pop(run_id, None)
        self._last_blob.pop(run_id, None)
        self._seq[run_id] = max(applied_seq, attempt * SEQ_SPAN)
        self._ref_prefix[run_id] = f"{attempt}."
        self._attempt[run_id] = attempt

    def forget(self, run_id: str) -> None:
        """Drop a run's buffered state without writing (it ended or was handed back)."""
        self._pending.pop(run_id, None)
        self._blob_refs.pop(run_id, None)
        self._last_blob.pop(run_id, None)
        self._seq.pop(run_id, None)
        self._ref_prefix.pop(run_id, None)
        self._attempt.pop(run_id, None)
        self._dead.pop(run_id, None)

    async def _wait(self, run_id: str, pending: _Pending) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.waiters.append(fut)
        self._dirty.set()
        self._urgent.set()
        await fut

    async def _run(self) -> None:
        # At most one flush per window, and the first event after a quiet window goes out at
        # once: an isolated token is not held back, a busy worker still batches.
        loop = asyncio.get_running_loop()
        last_flush = -float("inf")
        while True:
            await self._dirty.wait()
            wait = last_flush + self._flush_s - loop.time()
            if wait > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._urgent.wait()
            self._dirty.clear()
            self._urgent.clear()
            if not self._pending:
                continue  # a waiter on a batch already in flight: nothing new to write
            last_flush = loop.time()
            batch = self._take()
            try:
                results = await self._write(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must fail these runs, not stop every run's events
                log.exception("publishing failed; failing the runs of this flush")
                results = {run_id: AppendFailed(f"{type(exc).__name__}: {exc}") for run_id in batch}
            self.flushes += 1
            telemetry.PUBLISH_FLUSHES.inc()
            published = self.events_published
            for run_id, pending in batch.items():
                reply = results[run_id]
                if reply is None and not pending.waiters:
                    # Written, no cancel asked for, nobody waiting: `_settle` would only count.
                    self.events_published += len(pending.rows)
                else:
                    self._settle(run_id, pending, reply)
            telemetry.EVENTS_PUBLISHED.inc(self.events_published - published)

    def _take(self) -> dict[str, _Pending]:
        """What the next flush writes: every run's buffered events, but at most `max_events` of
        any one run, so one append (its script's time in Redis, its live batch, the pub/sub
        message readers get) stays bounded however fast a graph writes. A run's rest stays
        buffered, with its end and its waiters, and goes out in the next flush, at once."""
        cap = self._max_events
        if self._count <= cap:  # no run can have more: the usual case, as cheap as before
            taken, self._pending, self._count = self._pending, {}, 0
            return taken
        taken = {}
        rest: dict[str, _Pending] = {}
        for run_id, pending in self._pending.items():
            if len(pending.rows) <= cap:
                taken[run_id] = pending
                continue
            taken[run_id] = _Pending(rows=pending.rows[:cap], blobs=pending.blobs)
            pending.rows = pending.rows[cap:]
            pending.blobs = []
            rest[run_id] = pending
        self._pending = rest
        self._count = sum(len(p.rows) for p in rest.values())
        if rest:
            self._dirty.set()
            self._urgent.set()
        return taken

    def _settle(self, run_id: str, pending: _Pending, reply: Reply) -> None:
        """Wake the batch's waiters with its outcome and tell the worker what it must act on."""
        outcome: BaseException | None = None
        if isinstance(reply, BaseException):
            outcome = reply if isinstance(reply, AppendFailed) else AppendFailed(str(reply))
        elif reply == FENCED:
            outcome = Superseded(run_id, self._attempt.get(run_id, 0))
        else:
            self.events_published += len(pending.rows)
        waiters = pending.waiters
        if outcome is not None and run_id in self._attempt:
            self._dead[run_id] = outcome
            # What was buffered since can never be written: its waiters learn why.
            dropped = self._pending.pop(run_id, None)
            if dropped is not None:
                waiters = [*waiters, *dropped.waiters]
        for fut in waiters:
            if fut.done():
                continue
            if outcome is None:
                fut.set_result(None)
            else:
                fut.set_exception(outcome)
        if isinstance(outcome, AppendFailed) and self._on_failed is not None:
            self._on_failed(run_id, outcome)
        elif isinstance(reply, bytes) and self._on_cancel is not None:
            self._on_cancel(run_id, reply)

    async def _write(self, batch: dict[str, _Pending]) -> dict[str, Reply]:
        """Append every run's batch in one pipeline, as few script calls as the Redis allows;
        retry only appends that did not run.

        Transient errors are retried with backoff until Redis takes the batch; a run whose
        append Redis refuses `PERMANENT_TRIES` times gets the error as its result."""
        results: dict[str, Reply] = {}
        todo = list(batch)
        backoff = Backoff()
        per_call = self._log.runs_per_call
        reloaded = False
        while todo:
            pipe = self._redis.pipeline(transaction=False)
            calls = [todo[i : i + per_call] for i in range(0, len(todo), per_call)]
            for call in calls:
                appends = []
                for run_id in call:
                    p = batch[run_id]
                    if not p.seq:
                        p.seq = self._seq[run_id] = self._seq.get(run_id, 0) + 1
                    appends.append(RunAppend(
                        run_id, p.rows, p.blobs, p.status, p.seq, self._attempt.get(run_id, 0),
                        list(p.fields.items()),
                    ))  # fmt: skip
                self._log.append_runs_in(pipe, appends)
            try:
                answers = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                answers = [exc] * len(calls)
            replies: list[Reply] = []
            shared_refusal = False
            for call, answer in zip(calls, answers, strict=True):
                # A failed call failed each of its runs' appends (a retry skips what it applied).
                if isinstance(answer, Exception):
                    replies += [answer] * len(call)
                    shared_refusal |= len(call) > 1 and not is_transient(answer)
                else:
                    replies += answer
            if shared_refusal:
                # Redis refused a call of several runs: find out which run it refuses, one
                # call each from now on, before any run counts the refusal as its own.
                per_call = 1
            retry: list[str] = []
            for run_id, reply in zip(todo, replies, strict=True):
                if not isinstance(reply, Exception):
                    results[run_id] = reply
                elif is_transient(reply) or shared_refusal:
                    # Retried with the same sequence number, so it is applied at most once.
                    retry.append(run_id)
                else:
                    batch[run_id].failures += 1
                    if batch[run_id].failures >= PERMANENT_TRIES:
                        log.error("append for run %s refused, failing the run: %s", run_id, reply)
                        results[run_id] = reply
                    else:
                        retry.append(run_id)
            if not retry:
                break
            errors = [r for r in replies if isinstance(r, Exception)]
            if all(isinstance(r, NoScriptError) for r in errors) and not reloaded:
                # The server does not know the script yet (first use, or it restarted): load
                # it and send again at once; nothing failed.
                reloaded = True
                with contextlib.suppress(Exception):
                    await self._log.load_scripts()
            else:
                delay = backoff.next_delay()
                log.warning(
                    "append for %d run(s) failed, retrying in %.2fs: %s",
                    len(retry), delay, errors[0],
                )  # fmt: skip
                await asyncio.sleep(delay)
                if any(isinstance(r, NoScriptError) for r in errors):
                    with contextlib.suppress(Exception):
                        await self._log.load_scripts()
            todo = retry
        return results
