"""Publishes run events to Redis, coalesced.

Events of all runs of a worker are written at most once per short flush window (sooner when a
count bound is reached), in one pipelined round trip with one append script per run; the first
event after a quiet window is written at once. Each append also returns the
run's durable cancel request, so checking for a cancel costs nothing extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import NoScriptError

from broker import telemetry
from broker.connection import NETWORK_ERRORS, RedisClient
from broker.log import EventLog, Row, blob_kind, entry_name, stored_blob
from broker.models import Event, RunStatus

log = logging.getLogger("tokenrelay.publisher")


@dataclass(slots=True)
class _Pending:
    rows: list[Row] = field(default_factory=list)
    blobs: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: RunStatus | None = None
    seq: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


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
    ) -> None:
        self._redis = redis
        self._log = log_
        self._flush_s = flush_ms / 1000.0
        self._max_events = max_events
        self._on_cancel = on_cancel
        self._pending: dict[str, _Pending] = {}
        self._blob_refs: dict[str, dict[tuple[bool, bytes], bytes]] = {}
        self._seq: dict[str, int] = {}
        self._ref_prefix: dict[str, str] = {}
        self._attempt: dict[str, int] = {}
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
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def emit(self, run_id: str, event: Event) -> None:
        """Buffer `event` for `run_id`; it is written within the flush window."""
        pending = self._pending.get(run_id)
        if pending is None:
            pending = self._pending[run_id] = _Pending()
        ref = b""
        name = event.name
        if event.blob is not None:
            blob = stored_blob(event)
            refs = self._blob_refs.setdefault(run_id, {})
            key = (event.content_only, blob)
            ref = refs.get(key, b"")
            if not ref:
                kind = blob_kind(event)
                ref = kind + f"{self._ref_prefix.get(run_id, '')}{len(refs)}".encode()
                refs[key] = ref
                pending.blobs.append((ref, blob))
            name, ref = entry_name(event, ref)
        pending.rows.append((name, event.data, ref))
        self._count += 1
        self._dirty.set()
        if self._count >= self._max_events:
            self._urgent.set()

    async def close_run(self, run_id: str, events: list[Event], status: RunStatus) -> None:
        """Append the last `events` with the final `status` and wait until they are written."""
        for event in events:
            self.emit(run_id, event)
        pending = self._pending.setdefault(run_id, _Pending())
        pending.status = status
        await self._wait(run_id, pending)
        self.forget(run_id)

    async def flush_run(self, run_id: str) -> None:
        """Wait until everything buffered for `run_id` is written."""
        pending = self._pending.get(run_id)
        if pending is not None:
            await self._wait(run_id, pending)

    async def flush_all(self) -> None:
        waits = [self._wait(rid, p) for rid, p in list(self._pending.items())]
        await asyncio.gather(*waits)

    def begin_run(self, run_id: str, attempt: int, applied_seq: int = 0) -> None:
        """Start publishing for a run; a later attempt continues after the batches an earlier
        one wrote and names its metadata blobs apart from them."""
        self._seq[run_id] = applied_seq
        self._ref_prefix[run_id] = f"{attempt}."
        self._attempt[run_id] = attempt

    def forget(self, run_id: str) -> None:
        """Drop a run's buffered state without writing (it ended or was handed back)."""
        self._pending.pop(run_id, None)
        self._blob_refs.pop(run_id, None)
        self._seq.pop(run_id, None)
        self._ref_prefix.pop(run_id, None)
        self._attempt.pop(run_id, None)

    async def _wait(self, run_id: str, pending: _Pending) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.waiters.append(fut)
        self._dirty.set()
        self._urgent.set()
        await fut

    async def _run(self) -> None:
        # At most one flush per window, and the first event after a quiet window goes out at
        # once: an isolated token is not held back, a busy worker still batches.
        backoff = 0.05
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
            batch, self._pending, self._count = self._pending, {}, 0
            while True:
                try:
                    results = await self._write(batch)
                    backoff = 0.05
                    break
                except NETWORK_ERRORS as exc:
                    log.warning("publish failed, retrying in %.2fs: %s", backoff, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            self.flushes += 1
            telemetry.PUBLISH_FLUSHES.inc()
            for (run_id, pending), cancel in zip(batch.items(), results, strict=True):
                self.events_published += len(pending.rows)
                telemetry.EVENTS_PUBLISHED.inc(len(pending.rows))
                for fut in pending.waiters:
                    if not fut.done():
                        fut.set_result(None)
                if cancel is not None and self._on_cancel is not None:
                    self._on_cancel(run_id, cancel)

    async def _write(self, batch: dict[str, _Pending]) -> list[bytes | None]:
        """Append every run's batch in one pipeline; retry only appends that did not run."""
        results: dict[str, bytes | None] = {}
        todo = list(batch)
        while todo:
            pipe = self._redis.pipeline(transaction=False)
            for run_id in todo:
                p = batch[run_id]
                if not p.seq:
                    p.seq = self._seq[run_id] = self._seq.get(run_id, 0) + 1
                self._log.append_in(pipe, run_id, p.rows, blobs=p.blobs, status=p.status, seq=p.seq)
            replies = await pipe.execute(raise_on_error=False)
            retry: list[str] = []
            for run_id, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    retry.append(run_id)  # the server lost its scripts (restart): nothing ran
                elif isinstance(reply, Exception):
                    # Retried with the same sequence number, so it is applied at most once.
                    log.warning("append for run %s failed, retrying: %s", run_id, reply)
                    retry.append(run_id)
                else:
                    results[run_id] = reply
            if retry:
                await self._log.load_scripts()
                await asyncio.sleep(0.05)
            todo = retry
        return [results[run_id] for run_id in batch]
