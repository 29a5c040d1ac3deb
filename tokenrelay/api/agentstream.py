"""The agent streaming protocol's event stream: a subscription to a thread, over its runs' logs.

A run's events are numbered in its thread (entry ids ``<seq>-<ms>``, see scripts/append.lua), so
a subscription is a walk over the thread's runs in order: each run's log is tailed as the classic
endpoints tail it (the same shared live subscription per run and process), then the next run is
awaited on the thread's channel. A `since` cursor finds its run by the runs' first seqs and reads
from there: the cost follows what was missed, not the thread's history.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenrelay.api.deps import Services
from tokenrelay.api.fanout import Subscription
from tokenrelay.api.routes.runs import unblock
from tokenrelay.broker import codec
from tokenrelay.broker.errors import RunNotFound
from tokenrelay.broker.log import Batch
from tokenrelay.broker.models import ZERO_ID, Entry, Gap, StreamId
from tokenrelay.broker.protocol import CHANNELS, to_protocol, valid_channel

_ENVELOPE = (
    b'{"type":"event","event_id":"%s","seq":%d,"method":"%s",'
    b'"params":{"namespace":%s,"timestamp":%d%s,"data":%s}}'
)

# Entry ids below this first part are thread seqs; above it, Redis' own millisecond ids.
_SEQ_IDS_BELOW = 10**12

_RENDERED = "protocol"
"""`Batch.memo` key of a live batch's protocol events."""


class ProtocolError(Exception):
    """A command or subscription the protocol refuses, with one of its error codes."""

    STATUS = {
        "invalid_argument": 400,
        "unknown_command": 400,
        "not_supported": 400,
        "permission_denied": 403,
        "no_such_run": 404,
        "no_such_subscription": 404,
        "no_such_namespace": 404,
        "no_such_interrupt": 404,
        "no_such_checkpoint": 404,
        "unknown_error": 500,
    }

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return self.STATUS.get(self.code, 400)

    def answer(self, command_id: int | None) -> dict[str, Any]:
        return {"type": "error", "id": command_id, "error": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a subscription carries: channels, namespace prefixes and a depth below
    them, matched as the client matches them (a prefix segment without ``:`` also matches a
    segment with a task suffix)."""

    channels: frozenset[str]
    namespaces: tuple[tuple[str, ...], ...] = ()
    depth: int | None = None

    @classmethod
    def parse(cls, params: Any) -> EventFilter:
        if not isinstance(params, dict):
            raise ProtocolError("invalid_argument", "the subscription must be a JSON object")
        channels = params.get("channels")
        if not isinstance(channels, list) or not channels:
            raise ProtocolError("invalid_argument", "`channels` must be a non-empty list")
        for channel in channels:
            if not isinstance(channel, str) or not valid_channel(channel):
                known = ", ".join(sorted(CHANNELS))
                raise ProtocolError(
                    "invalid_argument",
                    f"unknown channel {channel!r}: expected one of {known}, or custom:<name>",
                )
        namespaces = params.get("namespaces")
        if namespaces is None:
            namespaces = []
        if not isinstance(namespaces, list) or not all(
            isinstance(ns, list) and all(isinstance(seg, str) for seg in ns) for ns in namespaces
        ):
            raise ProtocolError(
                "invalid_argument", "`namespaces` must be a list of lists of strings"
            )
        depth = params.get("depth")
        if depth is not None and (
            not isinstance(depth, int) or isinstance(depth, bool) or depth < 0
        ):
            raise ProtocolError("invalid_argument", "`depth` must be a non-negative integer")
        return cls(frozenset(channels), tuple(tuple(ns) for ns in namespaces), depth)

    def wants(self, channel: str, namespace: Sequence[str]) -> bool:
        if channel not in self.channels and not (
            channel.startswith("custom:") and "custom" in self.channels
        ):
            return False
        if not self.namespaces:
            return True
        return any(
            _is_prefix(namespace, prefix)
            and (self.depth is None or len(namespace) - len(prefix) <= self.depth)
            for prefix in self.namespaces
        )

    def select(self, entries: list[Entry]) -> list[ProtocolEvent]:
        """The protocol events of `entries` this filter carries."""
        return [e for e in rendered(entries) if self.wants(e.channel, e.namespace)]


def select_any(filters: Iterable[EventFilter], entries: list[Entry]) -> list[ProtocolEvent]:
    """The protocol events of `entries` any of `filters` carries, each once, in order."""
    filters = tuple(filters)
    return [e for e in rendered(entries) if any(f.wants(e.channel, e.namespace) for f in filters)]


def rendered(entries: list[Entry]) -> list[ProtocolEvent]:
    """The protocol events of `entries`. A live batch shared by the run's readers in this
    process (a `Batch` with a memo) is rendered once for all."""
    memo = entries.memo if isinstance(entries, Batch) else None
    events: list[ProtocolEvent] | None = memo.get(_RENDERED) if memo is not None else None
    if events is None:
        events = [e for e in map(render, entries) if e is not None]
        if memo is not None:
            memo[_RENDERED] = events
    return events


def _is_prefix(namespace: Sequence[str], prefix: Sequence[str]) -> bool:
    if len(prefix) > len(namespace):
        return False
    for want, have in zip(prefix, namespace, strict=False):
        if want == have:
            continue
        if ":" in want or have.split(":", 1)[0] != want:
            return False
    return True


@dataclass(slots=True)
class ProtocolEvent:
    """One stored event rendered for the protocol: its JSON envelope, ready to send. Never
    changed once made; not frozen, for the time a frozen one takes to make (one per live
    event per process)."""

    seq: int
    method: str
    channel: str
    namespace: list[str]
    payload: bytes


def render(entry: Entry) -> ProtocolEvent | None:
    """`entry` as a protocol event, or None when the protocol does not carry it. The payload
    is spliced from the stored bytes; only reshaped modes (updates, checkpoints) decode."""
    base, *namespace = entry.name.split("|")
    mapped = to_protocol(base, entry.data)
    if mapped is None:
        return None
    method, channel, data = mapped
    seq, ts = entry.id.ms, entry.id.seq
    if seq >= _SEQ_IDS_BELOW:  # a run started before events were numbered in their thread
        ts = seq
    payload = _ENVELOPE % (
        b"%d-%d" % (entry.id.ms, entry.id.seq),
        seq,
        method.encode(),
        codec.json_bytes(namespace) if namespace else b"[]",
        ts,
        _node_member(entry.node) if entry.node else b"",
        data,
    )
    return ProtocolEvent(seq, method, channel, namespace, payload)


@functools.lru_cache(maxsize=1024)
def _node_member(node: bytes) -> bytes:
    """The envelope's ``,"node":<name>`` member: a graph has few nodes, a run many tokens."""
    return b',"node":' + codec.json_bytes(node.decode())


def gap_error(gap: Gap) -> bytes:
    """What a subscriber is told when events it should get were trimmed away."""
    message = (
        f"events after seq {gap.after.ms} are no longer retained; "
        f"the stream goes on from seq {gap.resumes_at.ms}"
    )
    return codec.json_bytes(
        {"type": "error", "id": None, "error": "unknown_error", "message": message}
    )


async def thread_last_seq(svc: Services, thread_id: str) -> int:
    """The seq of the newest event of the thread (finished runs, then the active run)."""
    last = await svc.threads.last_seq(thread_id)
    active = await svc.runs.active_run(thread_id)
    if active:
        last = max(last, await svc.runs.last_seq(active))
    return last


async def fresh_start(svc: Services, thread_id: str) -> str | None:
    """The run a subscription made now without a cursor starts with (from its start), or
    None when the thread's newest run waits for a worker or it has none."""
    return (await _start(svc, thread_id, None))[0]


async def _start(
    svc: Services, thread_id: str, since: int | None
) -> tuple[str | None, int, StreamId, set[str]]:
    """Where a subscription starts: (run, its created_at, position in it, runs already past).
    No cursor: the thread's latest started run, from its start (the client drops what it
    already has by `event_id`). A cursor: the run holding seq `since` + 1."""
    runs = await svc.runs.thread_runs(thread_id, newest_first=True)
    past: set[str] = set()
    oldest: tuple[str, int] | None = None
    for run_id, created in runs:
        try:
            run = await svc.runs.get(run_id)
        except RunNotFound:
            continue
        base = run.seq_base
        if since is None:
            if base:
                return run_id, created, ZERO_ID, past
            if not run.status.terminal:
                # The newest run waits for a worker: it is what this subscriber came for, and
                # replaying the run before it would show that one's end as this one's.
                return None, created, ZERO_ID, past
            continue
        if not base:
            continue
        if base <= since + 1:
            return run_id, created, StreamId.after_thread_seq(since), past
        oldest = (run_id, created)
    if oldest is not None:  # every retained run is newer than the cursor
        return oldest[0], oldest[1], ZERO_ID, past
    return None, 0, ZERO_ID, past


QUEUED_POLL_SECONDS = 0.05
"""How soon a subscription first looks again at a run that waits for a worker. Its start is
announced on the thread's channel, which the subscription heard from before its first look
(missed announcements, after pub/sub reconnected, make it look again at once): the looks
only cover an announcement that was never made (its worker died between numbering the run
and announcing it), so each waits twice as long as the one before, up to
`QUEUED_POLL_MAX_SECONDS`."""

QUEUED_POLL_MAX_SECONDS = 1.0


async def _next_run(
    svc: Services, thread_id: str, from_ms: int, past: set[str]
) -> tuple[str, int] | bool:
    """The thread's next run to deliver once a worker has numbered its events; else whether
    a run waits to start (True) or none is there (False)."""
    for run_id, created in await svc.runs.thread_runs(thread_id, from_ms=from_ms):
        if run_id in past:
            continue
        try:
            run = await svc.runs.get(run_id)
        except RunNotFound:
            past.add(run_id)
            continue
        if run.seq_base:
            return run_id, created
        if run.status.terminal:  # ended before any worker started it: it has no events
            past.add(run_id)
            continue
        return True  # queued: its events come after it starts
    return False


async def _run_events(
    svc: Services, run_id: str, after: StreamId, deliver: Callable[[Batch], bool] | None = None
) -> AsyncIterator[list[Entry] | Gap | None]:
    """A run's events after `after`, to its end (as the classic streams tail it); live
    batches `deliver` takes while the tail waits (`EventLog.tail_pages`) are not yielded."""

    def taken(batch: Batch) -> bool:
        nonlocal after
        if deliver is None or not deliver(batch):
            return False
        after = batch[-1].id
        return True

    async with svc.fanout.subscribe(run_id) as live:
        tail = svc.log.tail_batches(
            run_id, after, live, idle_seconds=svc.settings.heartbeat_seconds,
            deliver=taken if deliver is not None else None,
        )  # fmt: skip
        async for item in tail:
            if item is None:
                try:
                    run = await svc.runs.get(run_id)
                except RunNotFound:
                    return
                if run.status.terminal and not await svc.log.has_after(run_id, after):
                    return
            elif not isinstance(item, Gap):
                after = item[-1].id
            yield item
            if isinstance(item, list) and item[-1].is_end:
                return


async def thread_events(
    svc: Services,
    thread_id: str,
    since: int | None,
    wake: Subscription,
    on_run: Callable[[str], None] | None = None,
    deliver: Callable[[Batch], bool] | None = None,
) -> AsyncIterator[list[Entry] | Gap | None]:
    """The thread's events, run after run, for as long as the caller reads: batches of
    entries, a Gap where history was trimmed, None when idle (for heartbeats). `wake` is the
    caller's subscription to the thread (`Fanout.subscribe_thread`), made before it answers,
    so no run's start falls between the answer and the subscription. `on_run` is told each
    run's id before its first batch. Live batches `deliver` takes while the caller waits for
    the next (see `EventLog.tail_pages`) are not yielded."""
    heartbeat = svc.settings.heartbeat_seconds
    run_id, created, after, past = await _start(svc, thread_id, since)
    while True:
        if run_id is not None:
            if on_run is not None:
                on_run(run_id)
            async for item in _run_events(svc, run_id, after, deliver):
                yield item
            past.add(run_id)
            after = ZERO_ID
        found = await _next_run(svc, thread_id, created, past)
        idle, poll = 0.0, QUEUED_POLL_SECONDS
        while not isinstance(found, tuple):
            wait = min(poll, heartbeat - idle) if found else heartbeat - idle
            woken = await wake.get(wait) is not None
            if wake.overflowed:
                # Announcements may have been missed (pub/sub reconnected): hear them again
                # from here on, and look now.
                wake.reset()
                poll = QUEUED_POLL_SECONDS
            elif not woken:
                idle += wait
                poll = min(2 * poll, QUEUED_POLL_MAX_SECONDS)
                if idle >= heartbeat:
                    idle = 0.0
                    if found:  # a run waits to start: free the thread if it never can
                        await unblock(svc, thread_id)
                    yield None
            found = await _next_run(svc, thread_id, created, past)
        run_id, created = found


class SubscribedStream:
    """An event stream whose thread subscription was made before the response started, and is
    released when the body is closed, whether or not it was ever read."""

    def __init__(self, svc: Services, thread_id: str) -> None:
        self._svc = svc
        self._thread_id = thread_id
        self._stack = contextlib.AsyncExitStack()
        self._body: AsyncIterator[bytes] | None = None

    async def open(self, body: Callable[[Subscription], AsyncIterator[bytes]]) -> SubscribedStream:
        wake = await self._stack.enter_async_context(
            self._svc.fanout.subscribe_thread(self._thread_id)
        )
        self._body = body(wake)
        return self

    def __aiter__(self) -> SubscribedStream:
        return self

    async def __anext__(self) -> bytes:
        assert self._body is not None
        return await anext(self._body)

    async def aclose(self) -> None:
        try:
            if self._body is not None:
                await self._body.aclose()  # type: ignore[attr-defined]
        finally:
            await self._stack.aclose()
