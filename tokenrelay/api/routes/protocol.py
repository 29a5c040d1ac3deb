"""The agent streaming protocol of `@langchain/react` 1.x `useStream`: commands, and a thread's
event stream over SSE or a WebSocket (see ``tokenrelay/api/agentstream.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response

from tokenrelay.api.agentstream import (
    EventFilter,
    ProtocolError,
    SubscribedStream,
    fresh_start,
    gap_error,
    select_any,
    thread_events,
    thread_last_seq,
)
from tokenrelay.api.auth import Caller, caller, can_deny
from tokenrelay.api.deps import Services, services
from tokenrelay.api.fanout import Subscription
from tokenrelay.api.routes.runs import start_run
from tokenrelay.api.routes.threads import graph_of
from tokenrelay.api.schemas import RunCreate, WireJSON, id_problem
from tokenrelay.api.sse import (
    HEARTBEAT,
    EventStreamResponse,
    LiveWriter,
    format_error,
    format_protocol_event,
)
from tokenrelay.broker import codec, telemetry
from tokenrelay.broker.errors import Conflict, InvalidBody, NotFound
from tokenrelay.broker.log import Batch
from tokenrelay.broker.models import ZERO_ID, Entry, Gap, StreamId
from tokenrelay.broker.protocol import checkpoint_summary
from tokenrelay.broker.runs import new_id
from tokenrelay.broker.runtime import cancel_and_wait
from tokenrelay.broker.threads import ThreadRecord

router = APIRouter(tags=["agent protocol"])
log = logging.getLogger("tokenrelay.protocol")

AGENT_PROTOCOL = "agent"
"""`stream_protocol` of the runs this protocol starts: the worker streams them through
LangGraph's protocol event stream (see ``tokenrelay/producer/runner.py``)."""


# -- commands ---------------------------------------------------------------------------------


def _command(body: Any) -> tuple[int, str, dict[str, Any]]:
    if not isinstance(body, dict):
        raise ProtocolError("invalid_argument", "a command is a JSON object")
    cid, method, params = body.get("id"), body.get("method"), body.get("params", {})
    if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
        raise ProtocolError("invalid_argument", "a command needs a non-negative integer `id`")
    if not isinstance(method, str):
        raise ProtocolError("invalid_argument", "a command needs a string `method`")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError("invalid_argument", "`params` must be a JSON object")
    return cid, method, params


def _dict_param(params: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = params.get(name)
    if value is not None and not isinstance(value, dict):
        raise ProtocolError("invalid_argument", f"`{name}` must be a JSON object")
    return value


async def _thread(svc: Services, thread_id: str) -> ThreadRecord:
    try:
        return await svc.threads.get(thread_id)
    except NotFound:
        raise ProtocolError("invalid_argument", f"Thread with ID {thread_id} not found") from None


async def _start(
    svc: Services, who: Caller, thread_id: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """Start a run as the classic API does (thread created when missing, multitask strategy),
    streamed for this protocol; returns the command's result."""
    body = {"if_not_exists": "create", "multitask_strategy": "enqueue", **fields}
    body["stream_protocol"] = AGENT_PROTOCOL
    try:
        run = await start_run(svc, thread_id, RunCreate.model_validate(body), who)
    except NotFound as exc:  # an unknown assistant, or someone else's thread
        raise ProtocolError("invalid_argument", str(exc)) from None
    except (InvalidBody, Conflict, ValueError) as exc:
        raise ProtocolError("invalid_argument", str(exc)) from None
    except HTTPException as exc:  # refused by the project's auth handlers
        raise ProtocolError("permission_denied", str(exc.detail)) from None
    return {"run_id": run.run_id}


_RUN_START_OPTIONS = (
    "multitask_strategy", "checkpoint_id", "interrupt_before", "interrupt_after", "durability",
)  # fmt: skip
"""`run.start` params passed on to the run as they are."""


async def _run_start(
    svc: Services, who: Caller, thread_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    assistant_id = params.get("assistant_id")
    if not isinstance(assistant_id, str) or not assistant_id:
        raise ProtocolError("invalid_argument", "run.start needs an `assistant_id`")
    fields: dict[str, Any] = {"assistant_id": assistant_id, "input": params.get("input")}
    for name in ("config", "metadata", "context"):
        value = _dict_param(params, name)
        if value is not None:
            fields[name] = value
    for name in _RUN_START_OPTIONS:
        if params.get(name) is not None:
            fields[name] = params[name]
    return await _start(svc, who, thread_id, fields)


async def _pending_interrupts(svc: Services, thread: ThreadRecord) -> dict[str, list[str]]:
    """Interrupt ids the thread waits on, by namespace key ("" for the root graph)."""
    state = await svc.states.get(graph_of(thread), thread.thread_id)
    out: dict[str, list[str]] = {}
    for task in state.get("tasks") or []:
        for interrupt in task.get("interrupts") or []:
            out.setdefault("", []).append(str(interrupt.get("id")))
    return out


async def _input_respond(
    svc: Services, who: Caller, thread_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    if "responses" in params:
        entries = params["responses"]
        if not isinstance(entries, list) or not entries:
            raise ProtocolError("invalid_argument", "`responses` must be a non-empty list")
    else:
        entries = [params]
    resume: dict[str, Any] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("interrupt_id"), str):
            raise ProtocolError("invalid_argument", "each response needs an `interrupt_id`")
        resume[entry["interrupt_id"]] = entry.get("response")
    thread = await _thread(svc, thread_id)
    pending = {i for ids in (await _pending_interrupts(svc, thread)).values() for i in ids}
    unknown = [i for i in resume if i not in pending]
    if unknown:
        raise ProtocolError(
            "no_such_interrupt", f"the thread has no pending interrupt {unknown[0]!r}"
        )
    command: dict[str, Any] = {"resume": resume}
    for name in ("update", "goto"):
        if params.get(name) is not None:
            command[name] = params[name]
    assistant_id = thread.metadata.get("assistant_id") or thread.metadata.get("graph_id")
    if not isinstance(assistant_id, str):
        raise ProtocolError("invalid_argument", "the thread has no assistant to resume")
    fields: dict[str, Any] = {"assistant_id": assistant_id, "command": command}
    for name in ("config", "metadata"):
        value = _dict_param(params, name)
        if value is not None:
            fields[name] = value
    await _start(svc, who, thread_id, fields)
    return {}


async def _agent_tree(
    svc: Services, who: Caller, thread_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    run_id = params.get("run_id") or await svc.runs.active_run(thread_id)
    if not isinstance(run_id, str) or not run_id:
        raise ProtocolError("no_such_run", "no run is active on the thread")
    try:
        run = await svc.runs.find(thread_id, run_id)
    except NotFound:
        raise ProtocolError("no_such_run", f"Run with ID {run_id} not found") from None
    status = {"pending": "started", "running": "running", "success": "completed",
              "error": "failed"}.get(run.status.value, "interrupted")  # fmt: skip
    graph_name = svc.registry.graph_id(run.assistant_id)
    return {"tree": {"namespace": [], "status": status, "graph_name": graph_name, "children": []}}


async def _state_get(
    svc: Services, who: Caller, thread_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    thread = await _thread(svc, thread_id)
    namespace = params.get("namespace") or []
    if namespace:
        raise ProtocolError("no_such_namespace", "only the root namespace has a state here")
    state = await svc.states.get(graph_of(thread), thread_id)
    values = state.get("values") or {}
    keys = params.get("keys")
    if isinstance(keys, list) and isinstance(values, dict):
        values = {k: v for k, v in values.items() if k in keys}
    out: dict[str, Any] = {"values": values}
    checkpoint = state.get("checkpoint") or {}
    if checkpoint.get("checkpoint_id"):
        out["checkpoint"] = {"id": checkpoint["checkpoint_id"]}
    return out


async def _list_checkpoints(
    svc: Services, who: Caller, thread_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    thread = await _thread(svc, thread_id)
    limit = params.get("limit", 10)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise ProtocolError("invalid_argument", "`limit` must be an integer from 1 to 1000")
    before = params.get("before")
    if before is not None and not isinstance(before, str):
        raise ProtocolError("invalid_argument", "`before` must be a checkpoint id")
    history = await svc.states.history(
        graph_of(thread), thread_id, limit=limit,
        before={"checkpoint_id": before} if before else None,
    )  # fmt: skip
    out = []
    for snap in history:
        summary = checkpoint_summary(snap)
        item: dict[str, Any] = {
            "id": (snap.get("checkpoint") or {}).get("checkpoint_id"),
            "timestamp": snap.get("created_at"),
            "step": summary["step"],
            "metadata": snap.get("metadata") or {},
        }
        writes = (snap.get("metadata") or {}).get("writes") or {}
        if isinstance(writes, dict) and len(writes) == 1:
            item["node_name"] = next(iter(writes))
        out.append(item)
    return {"checkpoints": out}


async def _state_fork(
    svc: Services, who: Caller, thread_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    thread = await _thread(svc, thread_id)
    checkpoint_id = params.get("checkpoint_id")
    if not isinstance(checkpoint_id, str) or not checkpoint_id:
        raise ProtocolError("invalid_argument", "state.fork needs a `checkpoint_id`")
    graph_id = graph_of(thread)
    state = await svc.states.get(graph_id, thread_id, {"checkpoint_id": checkpoint_id})
    if (state.get("checkpoint") or {}).get("checkpoint_id") != checkpoint_id:
        raise ProtocolError("no_such_checkpoint", f"no checkpoint {checkpoint_id!r} on the thread")
    assistant_id = thread.metadata.get("assistant_id") or graph_id
    fields: dict[str, Any] = {
        "assistant_id": assistant_id,
        "input": params.get("input"),
        "checkpoint_id": checkpoint_id,
    }
    config = _dict_param(params, "config")
    if config is not None:
        fields["config"] = config
    result = await _start(svc, who, thread_id, fields)
    return {"run_id": result["run_id"], "thread_id": thread_id}


Handler = Callable[[Services, Caller, str, dict[str, Any]], Awaitable[dict[str, Any]]]
COMMANDS: dict[str, Handler] = {
    "run.start": _run_start,
    "input.respond": _input_respond,
    "agent.getTree": _agent_tree,
    "state.get": _state_get,
    "state.listCheckpoints": _list_checkpoints,
    "state.fork": _state_fork,
}


async def execute(
    svc: Services, who: Caller, thread_id: str, body: Any
) -> tuple[int, dict[str, Any]]:
    """Run one command; (HTTP status, the protocol's answer)."""
    cid: int | None = None
    try:
        if id_problem(thread_id) is not None:
            raise ProtocolError("invalid_argument", f"invalid thread id {thread_id[:140]!r}")
        cid, method, params = _command(body)
        handler = COMMANDS.get(method)
        if handler is None:
            if method.startswith("subscription."):
                raise ProtocolError(
                    "not_supported", f"{method} is a WebSocket command; over HTTP, POST "
                    f"/threads/{thread_id}/stream/events opens a subscription",
                )  # fmt: skip
            raise ProtocolError("unknown_command", f"unknown command {method!r}")
        applied = await thread_last_seq(svc, thread_id)
        result = await handler(svc, who, thread_id, params)
        return 200, {"type": "success", "id": cid, "result": result,
                     "meta": {"applied_through_seq": applied}}  # fmt: skip
    except ProtocolError as exc:
        return exc.status, exc.answer(cid)


@router.post("/threads/{thread_id}/commands")
async def command(
    thread_id: str,
    request: Request,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> Response:
    """One protocol command (`run.start`, `input.respond`, `agent.getTree`, `state.get`,
    `state.listCheckpoints`, `state.fork`) and its answer; someone else's thread is a 404."""
    await who.visible(thread_id)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        answer = ProtocolError("invalid_argument", f"the body is not JSON: {exc}").answer(None)
        return WireJSON(answer, status_code=400)
    status, answer = await execute(svc, who, thread_id, body)
    return WireJSON(answer, status_code=status)


# -- the event stream -------------------------------------------------------------------------


def _since(params: dict[str, Any], last_event_id: str | None) -> int | None:
    """The cursor: `since` in the body, else a `Last-Event-ID` header (the seq we sent as the
    SSE `id:`), as an EventSource-style client resends it."""
    since = params.get("since")
    if since is None and last_event_id is not None:
        try:
            since = int(last_event_id.strip())
        except ValueError:
            raise ProtocolError(
                "invalid_argument", f"Last-Event-ID {last_event_id[:40]!r} is not a seq"
            ) from None
    if since is None:
        return None
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise ProtocolError("invalid_argument", "`since` must be a non-negative integer seq")
    return since


async def _check_since(svc: Services, thread_id: str, since: int | None) -> None:
    if since is None:
        return
    last = await thread_last_seq(svc, thread_id)
    if since > last:
        raise ProtocolError(
            "invalid_argument", f"`since` {since} is past the thread's last event (seq {last})"
        )


def _frames(flt: EventFilter, entries: list[Entry]) -> list[bytes]:
    return [format_protocol_event(e.method, e.payload, e.seq) for e in flt.select(entries)]


async def _sse_body(
    svc: Services,
    thread_id: str,
    flt: EventFilter,
    since: int | None,
    wake: Subscription,
    writer: LiveWriter,
) -> AsyncIterator[bytes]:
    def deliver(batch: Batch) -> bool:
        frames = _frames(flt, batch)
        if frames:
            if not writer.write(b"".join(frames)):
                return False
            telemetry.EVENTS_SENT.inc(len(frames))
        return True

    telemetry.STREAMS_OPEN.inc()
    try:
        async for item in thread_events(svc, thread_id, since, wake, deliver=deliver):
            if item is None:
                yield HEARTBEAT
            elif isinstance(item, Gap):
                telemetry.GAPS.inc()
                yield format_error(gap_error(item))
            else:
                frames = _frames(flt, item)
                if frames:
                    telemetry.EVENTS_SENT.inc(len(frames))
                    yield b"".join(frames)
    finally:
        telemetry.STREAMS_OPEN.dec()


@router.post("/threads/{thread_id}/stream/events", response_model=None)
async def event_stream(
    thread_id: str,
    request: Request,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> Response:
    """A subscription to the thread's events (SSE): `channels`, `namespaces`, `depth`, and
    `since` to replay what came after a seq. It spans runs, with heartbeats while idle."""
    await who.visible(thread_id)
    try:
        try:
            params = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError as exc:
            raise ProtocolError("invalid_argument", f"the body is not JSON: {exc}") from None
        if id_problem(thread_id) is not None:
            raise ProtocolError("invalid_argument", f"invalid thread id {thread_id[:140]!r}")
        flt = EventFilter.parse(params)
        since = _since(params, request.headers.get("last-event-id"))
        await _check_since(svc, thread_id, since)
    except ProtocolError as exc:
        return WireJSON(exc.answer(None), status_code=exc.status)
    budget = svc.settings.stream_max_seconds
    deadline = asyncio.get_running_loop().time() + budget if budget else None
    writer = LiveWriter()
    body = await SubscribedStream(svc, thread_id).open(
        lambda wake: _sse_body(svc, thread_id, flt, since, wake, writer)
    )
    return EventStreamResponse(body, {}, deadline=deadline, abort=svc.draining, live_writer=writer)


class _Socket:
    """One WebSocket: commands in, answers and the events of its subscriptions out.

    The socket's subscriptions share one walk over the thread's events (a pump), so the
    socket carries them in seq order: a client pauses its streams on a run's terminal
    lifecycle event, and what a separate walk per subscription sent after that event, though
    older, would never be read. An event any subscription wants is sent once; the client
    hands it to each subscription whose filter matches. A subscription made while the pump
    is inside a run is first given that run's events the pump already sent, as a fresh walk
    would give them, in the pump's order."""

    def __init__(self, svc: Services, who: Caller, ws: WebSocket, thread_id: str) -> None:
        self.svc = svc
        self.who = who
        self.ws = ws
        self.thread_id = thread_id
        self.filters: dict[str, EventFilter] = {}
        self._pump: tuple[asyncio.Task[None], contextlib.AsyncExitStack] | None = None
        self._run: str | None = None
        """The run the pump walks, and the last of its entries the pump has sent."""
        self._sent = ZERO_ID
        self._order = asyncio.Lock()
        """Held while the pump sends a batch and while a new subscription is replayed."""
        self._closing: list[asyncio.Task[None]] = []
        self._send = asyncio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._send:
            await self.ws.send_text(data.decode())

    def _entered(self, run_id: str) -> None:
        self._run, self._sent = run_id, ZERO_ID

    async def pump(self, wake: Subscription) -> None:
        events = thread_events(self.svc, self.thread_id, None, wake, on_run=self._entered)
        async for item in events:
            if item is None:
                continue
            async with self._order:
                if isinstance(item, Gap):
                    await self.send(gap_error(item))
                    continue
                for event in select_any(self.filters.values(), item):
                    await self.send(event.payload)
                self._sent = item[-1].id

    async def handle(self, body: Any) -> None:
        method = body.get("method") if isinstance(body, dict) else None
        if method == "subscription.subscribe":
            await self._subscribe(body)
        elif method == "subscription.unsubscribe":
            await self.send(codec.json_bytes(self._unsubscribe(body)))
        elif method == "subscription.reconnect":
            cid = body.get("id")
            answer = {"type": "success", "id": cid, "result": {"restored": False}}
            await self.send(codec.json_bytes(answer))
        else:
            _, answer = await execute(self.svc, self.who, self.thread_id, body)
            await self.send(codec.json_bytes(answer))

    async def _subscribe(self, body: dict[str, Any]) -> None:
        try:
            cid, _, params = _command(body)
            flt = EventFilter.parse(params)
        except ProtocolError as exc:
            given = body.get("id")
            await self.send(codec.json_bytes(exc.answer(given if isinstance(given, int) else None)))
            return
        sub_id = new_id()
        answer = {"type": "success", "id": cid, "result": {"subscription_id": sub_id}}
        if self._pump is not None and self._pump[0].done():  # it failed: start afresh
            await _end(*self._pump)
            self._pump = None
        if self._pump is None:
            # Subscribed to the thread before the answer, so a run started next is not missed.
            subscribed = contextlib.AsyncExitStack()
            wake = await subscribed.enter_async_context(
                self.svc.fanout.subscribe_thread(self.thread_id)
            )
            self.filters[sub_id] = flt
            self._run, self._sent = None, ZERO_ID
            task = asyncio.create_task(self.pump(wake), name=f"ws-pump-{sub_id}")
            self._pump = (task, subscribed)
            await self.send(codec.json_bytes(answer))
            return
        async with self._order:
            await self.send(codec.json_bytes(answer))
            run_id, sent = self._run, self._sent
            # A fresh walk would start with the pump's run (not a newer or a queued one).
            if sent > ZERO_ID and run_id == await fresh_start(self.svc, self.thread_id):
                assert run_id is not None
                await self._replay(flt, run_id, sent)
            self.filters[sub_id] = flt

    async def _replay(self, flt: EventFilter, run_id: str, through: StreamId) -> None:
        async for item in self.svc.log.history(run_id, through):
            if isinstance(item, Gap):
                await self.send(gap_error(item))
            else:
                for event in flt.select(item):
                    await self.send(event.payload)

    def _unsubscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            cid, _, params = _command(body)
        except ProtocolError as exc:
            return exc.answer(None)
        if self.filters.pop(str(params.get("subscription_id")), None) is None:
            return ProtocolError("no_such_subscription", "no such subscription").answer(cid)
        if not self.filters and self._pump is not None:
            self._closing.append(asyncio.create_task(_end(*self._pump)))
            self._pump = None
        return {"type": "success", "id": cid, "result": {}}

    async def close(self) -> None:
        ends = [_end(*self._pump)] if self._pump is not None else []
        self._pump = None
        self.filters.clear()
        await asyncio.gather(*ends, *self._closing, return_exceptions=True)


async def _end(task: asyncio.Task[None], subscribed: contextlib.AsyncExitStack) -> None:
    """Stop a pump, then release its thread subscription (even if the pump never ran)."""
    await cancel_and_wait(task)
    await subscribed.aclose()


@router.websocket("/threads/{thread_id}/stream/events")
async def event_socket(ws: WebSocket, thread_id: str, who: Caller = Depends(caller)) -> None:
    """The protocol over one WebSocket: commands (including `subscription.subscribe` and
    `subscription.unsubscribe`) as JSON text frames, and the subscribed events pushed."""
    svc: Services = ws.app.state.services
    if id_problem(thread_id) is not None:
        await ws.close(code=1008, reason="invalid thread id")
        return
    try:
        await who.visible(thread_id)
    except NotFound as exc:  # someone else's thread: answered as the HTTP endpoints answer
        if can_deny(ws.scope):
            await ws.send_denial_response(WireJSON({"detail": str(exc)}, status_code=404))
        else:
            await ws.close(code=4404, reason=str(exc))
        return
    await ws.accept()
    sock = _Socket(svc, who, ws, thread_id)
    telemetry.STREAMS_OPEN.inc()
    draining: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    svc.draining.watch(draining)
    try:
        while True:
            receive: asyncio.Future[Any] = asyncio.ensure_future(ws.receive_text())
            done, _ = await asyncio.wait({receive, draining}, return_when=asyncio.FIRST_COMPLETED)
            if draining in done:
                receive.cancel()
                await ws.close(code=1012, reason="server restarting")
                return
            try:
                body = orjson.loads(receive.result())
            except orjson.JSONDecodeError as exc:
                error = ProtocolError("invalid_argument", f"the frame is not JSON: {exc}")
                await sock.send(codec.json_bytes(error.answer(None)))
                continue
            await sock.handle(body)
    except WebSocketDisconnect:
        pass
    finally:
        draining.cancel()
        telemetry.STREAMS_OPEN.dec()
        await sock.close()
