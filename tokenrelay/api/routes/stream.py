"""Streaming endpoints: start a run and stream it, join a run's stream with resume, and the
long-poll JSON fallback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.api.auth import Caller, caller, caller_of
from tokenrelay.api.deps import Services, services, services_of
from tokenrelay.api.direct import direct_route
from tokenrelay.api.routes.runs import cancel_run, repair_active, start_run, unblock
from tokenrelay.api.schemas import RunCreate, id_in_path, iso
from tokenrelay.api.sse import (
    HEARTBEAT,
    SSE_HEADERS,
    EventStreamResponse,
    LiveWriter,
    format_error,
    format_event,
    format_history,
    gap_payload,
)
from tokenrelay.api.tokens import StreamTokens
from tokenrelay.broker import codec, telemetry
from tokenrelay.broker.cancel import CancelAction
from tokenrelay.broker.errors import EventIdPastEnd, InvalidBody
from tokenrelay.broker.log import PAGE_SIZE, ROW_WIDTH, Batch, BlobResolver, History
from tokenrelay.broker.models import ZERO_ID, Entry, Gap, StreamId
from tokenrelay.broker.runs import RunRecord, new_id

router = APIRouter(tags=["stream"])

_FRAMED = "sse"
"""`Batch.memo` key of a live batch's SSE bytes (all its classic events) and their count."""


def run_headers(thread_id: str, run_id: str) -> dict[str, str]:
    run = f"/threads/{id_in_path(thread_id)}/runs/{run_id}"
    return {"Location": f"{run}/stream", "Content-Location": run}


def wanted(modes: list[str] | None) -> set[str] | None:
    """Event names a join asked for (`stream_mode` query), or None for all of them."""
    picked = [m for m in modes or [] if m]
    if not picked:
        return None
    names = {"metadata", "error"}
    for mode in picked:
        if mode == "messages-tuple":
            names.add("messages")
        elif mode == "messages":
            names.update({"messages/partial", "messages/complete", "messages/metadata"})
        else:
            names.add(mode)
    return names


THREAD_MODES = frozenset({"run_modes", "lifecycle", "state_update"})
"""The stream modes of a thread join in the LangGraph SDKs (`ThreadStreamMode`; they send
"run_modes" unless told otherwise)."""


def thread_wanted(modes: list[str] | None) -> set[str] | None:
    """Event names a thread join asked for: every event of the run for "run_modes" (or none
    given), its `metadata` and `error` for "lifecycle" and "state_update" (no state update events
    are streamed), and a run's stream modes select as in a run join."""
    picked = [m for m in modes or [] if m]
    if not picked or "run_modes" in picked:
        return None
    return wanted([m for m in picked if m not in THREAD_MODES]) or {"metadata", "error"}


async def run_events(
    svc: Services,
    run_id: str,
    after: StreamId | None,
    names: set[str] | None = None,
    last: Entry | None = None,
    first: Prefetched | None = None,
    writer: LiveWriter | None = None,
) -> AsyncIterator[bytes]:
    """SSE bytes of `run_id` after `after` (None: from now on) until the run ends, keeping
    only events named in `names` (by their mode, before any `|namespace`) when given.
    `last`, the run's newest entry as the caller read it, spares a read when `after` is
    given (a join from now must read it once subscribed); `first`, the page after `after`
    read with it, spares the first page read when the live feed missed nothing since.
    With `writer`, live batches that reach it while it waits are written by it (from the
    fan-out's turn) rather than yielded."""
    held: list[bytes] = []

    def deliver(batch: Batch) -> bool:
        nonlocal after
        if held or writer is None:
            return False
        frames, count = _live_frames(batch, names)
        if frames and not writer.write(frames):
            return False
        after = batch[-1].id
        if count:
            telemetry.EVENTS_SENT.inc(count)
        return True

    telemetry.STREAMS_OPEN.inc()
    try:
        async with svc.fanout.subscribe(run_id) as live:
            # From the start, the newest entry matters not: no id lies past it or at it.
            if after is None or (last is None and after != ZERO_ID):
                last = await svc.log.last_entry(run_id)
            if last is not None and last.is_end and (after is None or after >= last.id):
                return  # the run has ended and nothing lies after the cursor
            if after is None:
                after = last.id if last is not None else ZERO_ID
            rows, complete = None, False
            if first is not None and after is not None:
                rows, complete = first.rows, first.complete(after, live.joined)
            tail = svc.log.tail_pages(
                run_id, after, live, idle_seconds=svc.settings.heartbeat_seconds,
                first=rows, first_complete=complete,
                deliver=deliver if writer is not None else None,
            )  # fmt: skip
            # What is ready goes out in one write: while more live batches are queued (a
            # reader behind, as after a catch-up or on a busy process) their frames are held
            # and sent together, one write and one wake-up instead of one per batch.
            size = 0
            async for item in tail:
                if item is None:
                    # Idle. A run that ended behind our position (a client id past its end)
                    # must not hold the response open.
                    run = await svc.runs.get(run_id)
                    if run.status.terminal and not await svc.log.has_after(run_id, after):
                        break
                    await unblock(svc, run.thread_id, run)
                frames, ends = _frames(item, names)
                # A full page of history is followed by another page, read meanwhile: it
                # goes out at once. Anything else is followed by the live feed.
                follows_live = True
                if isinstance(item, History):
                    after = item.last
                    follows_live = len(item.rows) < PAGE_SIZE * ROW_WIDTH
                elif isinstance(item, list):
                    after = item[-1].id
                if frames:
                    held.append(frames)
                    size += len(frames)
                if ends:
                    break
                if held and (
                    not follows_live or size >= _HOLD_BYTES or not live.queued_after(after)
                ):
                    chunk = b"".join(held) if len(held) > 1 else held[0]
                    held.clear()  # the list `deliver` reads: nothing is held once sent
                    size = 0
                    yield chunk
            if held:
                chunk = b"".join(held)
                held.clear()
                yield chunk
    finally:
        telemetry.STREAMS_OPEN.dec()


@dataclass(frozen=True, slots=True)
class Prefetched:
    """A join's first page of history (`EventLog.page_of`), read before its live
    subscription, when the run's channel was live in this process at `epoch`."""

    rows: list[bytes]
    epoch: int

    def complete(self, after: StreamId, joined: tuple[int, StreamId | None]) -> bool:
        """Whether the live feed joined (`Subscription.joined`) missed nothing made after
        the page: the channel kept its epoch, and what it last delivered the page holds."""
        epoch, delivered = joined
        if epoch != self.epoch:
            return False
        end = StreamId.parse(self.rows[-ROW_WIDTH]) if self.rows else after
        return delivered is None or delivered <= end


async def start_streamed(
    svc: Services, thread_id: str | None, body: RunCreate, who: Caller
) -> tuple[RunRecord, Prefetched | None]:
    """`start_run` for a run streamed on the request that starts it, and its stream's first
    page of history, known to be empty (None: to be read).

    The run's channel is subscribed before the run is queued: a batch its worker publishes
    can then only reach the stream live, and the stream needs no read of history to begin,
    unless the feed missed something meanwhile (its epoch moved: a reconnect) or a batch came
    before the stream joined (`Prefetched.complete` sees either, and the page is read)."""
    run_id = new_id()
    async with svc.fanout.subscribe(run_id):
        epoch = svc.fanout.live_epoch(run_id)  # None: not confirmed in time
        run = await start_run(svc, thread_id, body, who, run_id=run_id)
    return run, Prefetched([], epoch) if epoch is not None else None


_HOLD_BYTES = 64 * 1024
"""Frames of queued live batches are held for one write up to this size."""


def _frames(item: History | list[Entry] | Gap | None, names: set[str] | None) -> tuple[bytes, bool]:
    """What `run_events` sends for one item of the tail, and whether the stream ends with it."""
    if item is None:
        return HEARTBEAT, False
    if isinstance(item, Gap):
        telemetry.GAPS.inc()
        return format_error(gap_payload(item)), False
    if isinstance(item, History):
        # A page of history, rendered in one pass over what Redis returned.
        frames, sent = format_history(item, names)
        if sent:
            telemetry.EVENTS_SENT.inc(sent)
        return (frames if sent else b""), item.ends
    frames, count = _live_frames(item, names)
    if count:
        telemetry.EVENTS_SENT.inc(count)
    return frames, item[-1].is_end


def _live_frames(item: list[Entry], names: set[str] | None) -> tuple[bytes, int]:
    """A live flush of the worker (or entries read back) as SSE bytes, and how many events
    they hold: framed once per process."""
    memo = item.memo if isinstance(item, Batch) and names is None else None
    framed: tuple[bytes, int] | None = memo.get(_FRAMED) if memo is not None else None
    if framed is None:
        chunk = [
            format_event(e)
            for e in item
            if e.classic and (names is None or e.name.split("|", 1)[0] in names)
        ]
        framed = (b"".join(chunk), len(chunk))
        if memo is not None:
            memo[_FRAMED] = framed  # the run's other readers here send it as is
    return framed


async def stream_response(
    svc: Services,
    thread_id: str,
    run_id: str,
    after: StreamId | None,
    *,
    max_seconds: float | None,
    finished: bool = False,
    names: set[str] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    last: Entry | None = None,
    first: Prefetched | None = None,
) -> EventStreamResponse:
    """The SSE response for a run, cut short (aborted, for resume) by the time budget or a
    shutdown unless the run has already finished."""
    budget = svc.settings.stream_max_seconds if max_seconds is None else max_seconds
    deadline = None
    if budget and not finished:
        deadline = asyncio.get_running_loop().time() + budget
    writer = LiveWriter()
    return EventStreamResponse(
        run_events(svc, run_id, after, names, last, first, writer),
        run_headers(thread_id, run_id),
        deadline=deadline,
        abort=None if finished else svc.draining,
        on_disconnect=on_disconnect,
        live_writer=writer,
    )


async def refuse_past_end(
    svc: Services, run_id: str, after: StreamId | None, end: Entry | None
) -> None:
    """A cursor beyond the end of a finished run (`end`: its newest entry) gets a 400 naming
    the run's last event id, rather than a stream that waits for events that will never come."""
    if after is None:
        return
    if end is not None and end.is_end and after > end.id:
        last = await svc.log.last_event(run_id)
        raise EventIdPastEnd(str(after), run_id, str(last.id) if last is not None else None)


def parse_last_event_id(header: str | None, query: str | None) -> StreamId | None:
    raw = header if header is not None else query
    if raw is None:
        return None
    telemetry.RESUMES.inc()
    return StreamId.parse_last_event_id(raw)


MaxSeconds = Query(
    default=None,
    gt=0,
    description="End the response after this many seconds (aborted, so clients resume with "
    "Last-Event-ID); defaults to TOKENRELAY_STREAM_MAX_SECONDS.",
)


StreamModes = Query(
    default=None,
    alias="stream_mode",
    description="Stream modes, as repeated parameters or a JSON array; on a create they "
    "override the body's, on a join they select which events to send.",
)


def query_modes(values: list[str] | None) -> list[str] | None:
    """`stream_mode` query values: repeated, comma-separated or a JSON array."""
    out: list[str] = []
    for value in values or []:
        value = value.strip()
        if value.startswith("["):
            try:
                parsed = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise InvalidBody(f"stream_mode {value!r} is not a JSON array") from None
            out += [str(v) for v in parsed]
        else:
            out += [v for v in value.split(",") if v]
    return out or None


async def _stream_new_run(
    svc: Services, who: Caller, thread_id: str | None, body: RunCreate,
    max_seconds: float | None, modes: list[str] | None,
) -> EventStreamResponse:  # fmt: skip
    if modes:
        body = body.with_stream_modes(modes)
    run, first = await start_streamed(svc, thread_id, body, who)

    async def creator_left() -> None:
        # on_disconnect=cancel: only the connection that created the run cancels it.
        await cancel_run(svc, await svc.runs.get(run.run_id), CancelAction.INTERRUPT)

    return await stream_response(
        svc, run.thread_id, run.run_id, ZERO_ID, max_seconds=max_seconds,
        on_disconnect=creator_left if body.on_disconnect == "cancel" else None, first=first,
    )  # fmt: skip


@router.post("/threads/{thread_id}/runs/stream")
async def stream_run(
    thread_id: str,
    body: RunCreate,
    max_seconds: float | None = MaxSeconds,
    stream_mode: list[str] | None = StreamModes,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> EventStreamResponse:
    modes = query_modes(stream_mode)
    return await _stream_new_run(svc, who, thread_id, body, max_seconds, modes)


@router.post("/runs/stream")
async def stream_stateless_run(
    body: RunCreate,
    max_seconds: float | None = MaxSeconds,
    stream_mode: list[str] | None = StreamModes,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> EventStreamResponse:
    return await _stream_new_run(svc, who, None, body, max_seconds, query_modes(stream_mode))


async def join_thread_stream(
    thread_id: str,
    last_event_id_header: str | None = Header(default=None, alias="Last-Event-ID"),
    last_event_id: str | None = Query(default=None),
    max_seconds: float | None = MaxSeconds,
    stream_mode: list[str] | None = StreamModes,
    accept: str | None = Header(default=None),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> EventStreamResponse | Response:
    """Join whatever run is active on the thread: enough to rejoin, and stop, from a page that
    only knows the thread. When none is, 204; but a client that asks for an event stream by
    name (`Accept: text/event-stream`, as the Python SDK's `join_stream` does, which refuses any
    other answer) gets an empty one, which ends at once."""
    after = parse_last_event_id(last_event_id_header, last_event_id)
    await who.thread(thread_id)
    run_id = await svc.runs.active_run(thread_id)
    if run_id is None or await repair_active(svc, thread_id, run_id):
        if accept is not None and "text/event-stream" in accept.lower():
            return Response(media_type="text/event-stream", headers=SSE_HEADERS)
        return Response(status_code=204)
    last = None if after is None else await svc.log.last_entry(run_id)
    await refuse_past_end(svc, run_id, after, last)
    return await stream_response(
        svc, thread_id, run_id, after, max_seconds=max_seconds,
        names=thread_wanted(query_modes(stream_mode)), last=last,
    )  # fmt: skip


async def join_run_stream(
    thread_id: str,
    run_id: str,
    last_event_id_header: str | None = Header(default=None, alias="Last-Event-ID"),
    last_event_id: str | None = Query(default=None),
    max_seconds: float | None = MaxSeconds,
    stream_mode: list[str] | None = StreamModes,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> EventStreamResponse:
    after = parse_last_event_id(last_event_id_header, last_event_id)
    # A resume into a run live in this process reads its first page with the lookup.
    epoch = None if after is None else svc.fanout.live_epoch(run_id)
    run, last, rows = await who.join(thread_id, run_id, None if epoch is None else after)
    await refuse_past_end(svc, run_id, after, last)
    first = None if rows is None or epoch is None else Prefetched(rows, epoch)
    return await stream_response(
        svc, thread_id, run_id, after, max_seconds=max_seconds, finished=run.status.terminal,
        names=wanted(query_modes(stream_mode)), last=last, first=first,
    )  # fmt: skip


# A reconnect storm is joins: their routes bind their own arguments (api/direct.py).
_PLAIN_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
"""A `max_seconds` that `float` reads as FastAPI's validation does (others are FastAPI's)."""


def _bind_join(request: Request) -> dict[str, Any] | None:
    """The arguments both joins share, as FastAPI binds them, or None when `max_seconds` needs
    validating."""
    query = request.query_params
    raw = query.get("max_seconds")
    max_seconds = None
    if raw is not None:
        if not _PLAIN_SECONDS.fullmatch(raw) or float(raw) <= 0:
            return None  # FastAPI's to parse or refuse (422)
        max_seconds = float(raw)
    return {
        "thread_id": request.path_params["thread_id"],
        "last_event_id_header": request.headers.get("last-event-id"),
        "last_event_id": query.get("last_event_id"),
        "max_seconds": max_seconds,
        "stream_mode": query.getlist("stream_mode") or None,
        "svc": services_of(request),
        "who": caller_of(request),
    }


def _bind_thread_join(request: Request) -> dict[str, Any] | None:
    """The arguments of `join_thread_stream`, as `_bind_join`."""
    args = _bind_join(request)
    if args is not None:
        args["accept"] = request.headers.get("accept")
    return args


def _bind_run_join(request: Request) -> dict[str, Any] | None:
    """The arguments of `join_run_stream`, as `_bind_join`."""
    args = _bind_join(request)
    if args is not None:
        args["run_id"] = request.path_params["run_id"]
    return args


router.add_api_route(
    "/threads/{thread_id}/stream", join_thread_stream, methods=["GET"], response_model=None,
    route_class_override=direct_route(_bind_thread_join),
)  # fmt: skip
router.add_api_route(
    "/threads/{thread_id}/runs/{run_id}/stream", join_run_stream, methods=["GET"],
    route_class_override=direct_route(_bind_run_join),
)  # fmt: skip


@router.get("/threads/{thread_id}/runs/{run_id}/events")
async def poll_run_events(
    thread_id: str,
    run_id: str,
    after: str = Query(default="0", description="the `next` of the previous answer; 0 = start"),
    wait_ms: int = Query(default=0, ge=0, le=60_000),
    limit: int = Query(default=512, ge=1, le=10_000),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> Response:
    """Long-poll fallback: events after `after`, waiting up to `wait_ms` for the first one."""
    since = StreamId.parse_last_event_id(after)
    await who.thread(thread_id, run_id=run_id)
    run = await svc.runs.find(thread_id, run_id)
    gap = await svc.log.gap_after(run_id, since)
    entries = await svc.log.read(run_id, since, count=limit)
    if not entries and wait_ms and not run.status.terminal:
        async with svc.fanout.subscribe(run_id) as live:
            entries = await svc.log.read(run_id, since, count=limit)
            if not entries:
                await live.get(wait_ms / 1000)
                entries = await svc.log.read(run_id, since, count=limit)
    blobs = BlobResolver(svc.log, run_id)
    out: list[dict[str, Any]] = []
    if gap is not None:
        telemetry.GAPS.inc()
        out.append({"id": None, "event": "error", "data": codec.json_fragment(gap_payload(gap))})
    done = False
    nxt = since
    for entry in entries:
        nxt = entry.id
        if entry.is_end:
            done = True
            break
        if not entry.classic:
            continue
        entry = await blobs.resolve(entry)
        out.append(
            {"id": str(entry.id), "event": entry.name, "data": codec.json_fragment(entry.data)}
        )
    if not done and not entries:
        done = run.status.terminal and not await svc.log.has_after(run_id, since)
    body = orjson.dumps({"events": out, "next": str(nxt), "done": done})
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


class StreamTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str | None = None
    ttl_seconds: int | None = Field(default=None, ge=1)


@router.post("/threads/{thread_id}/stream_token")
async def issue_stream_token(
    thread_id: str,
    body: StreamTokenRequest | None = None,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    """A short-lived token that opens this thread's streams (only `run_id`'s when given) as
    `?stream_token=`: a browser resumes with it, no long-lived secret and no proxy needed."""
    body = body or StreamTokenRequest()
    await who.thread(thread_id, run_id=body.run_id)
    if body.run_id is not None:
        await svc.runs.find(thread_id, body.run_id)
    limit = svc.settings.stream_token_ttl_seconds
    ttl = min(body.ttl_seconds or limit, limit)
    user = who.identity.user
    subject = None if user is None else str(user.identity)
    token, expires_at = StreamTokens.from_settings(svc.settings).issue(
        thread_id, body.run_id, ttl, subject
    )
    return {
        "token": token,
        "thread_id": thread_id,
        "run_id": body.run_id,
        "expires_at": iso(expires_at * 1000),
    }
