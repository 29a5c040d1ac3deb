"""The Vercel AI SDK's UI message stream protocol (v1), for ``useChat({resume: true})``.

A chat is a thread (chat id = thread id). ``POST /ai/chat`` starts a run with the last user
message and streams it as UI message parts; ``GET /ai/chat/{id}/stream`` replays the chat's
active run from its ``start`` part and goes live (204 when nothing is active); ``POST
/ai/chat/{id}/stop`` cancels it, keeping the partial reply in the thread. Text becomes text
parts, reasoning blocks reasoning parts; the graph's tool calls and their results, dynamic tool
parts; its custom events, data parts (`UIParts`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from tokenrelay.api.auth import Caller, caller
from tokenrelay.api.deps import Services, services
from tokenrelay.api.routes.runs import cancel_run
from tokenrelay.api.routes.stream import Prefetched, start_streamed
from tokenrelay.api.schemas import ClientId, RunCreate, id_in_path
from tokenrelay.api.sse import (
    HEARTBEAT,
    EventStreamResponse,
    LiveWriter,
    format_data,
    gap_payload,
)
from tokenrelay.broker import codec, telemetry
from tokenrelay.broker.cancel import CancelAction
from tokenrelay.broker.errors import InvalidBody, NotFound
from tokenrelay.broker.log import Batch, History
from tokenrelay.broker.models import ZERO_ID, Entry, Gap, RunStatus

router = APIRouter(prefix="/ai", tags=["ai-sdk"])

UI_STREAM_HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE = b"[DONE]"


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    role: str
    parts: list[dict[str, Any]] = Field(default_factory=list)
    content: str | None = None

    def text(self) -> str:
        texts = [str(p.get("text", "")) for p in self.parts if p.get("type") == "text"]
        return "".join(texts) if texts else (self.content or "")


class ChatRequest(BaseModel):
    """What ``DefaultChatTransport`` posts, plus an optional ``assistant_id``."""

    model_config = ConfigDict(extra="allow")
    id: ClientId
    messages: list[UIMessage] = Field(min_length=1)
    assistant_id: str | None = None


def _part(obj: dict[str, Any]) -> bytes:
    return format_data(codec.json_bytes(obj))


def _error_part(error: bytes) -> bytes:
    """An `error` part from an error event's JSON (``{"error": ..., "message": ...}``)."""
    err = codec.json_loads(error)
    return _part({"type": "error", "errorText": f"{err['error']}: {err['message']}"})


class UIParts:
    """Turns a run's entries into UI message stream parts: an AI message's text as a text part,
    its tool calls as dynamic tool parts whose input streams (`tool-input-start`, `-delta`, then
    `-available` once the message is whole), and a tool message as that call's output. The tools
    are the graph's, run on the server: the parts say so (`providerExecuted`), so a client's
    `onToolCall` and `sendAutomaticallyWhen` leave them alone.

    What a reader carries from one entry to the next: the text part it has open, the tool calls
    of the AI message being streamed, the calls the client knows of, whether the run failed and
    whether it ended."""

    __slots__ = (
        "announced", "calls", "calls_of", "ended", "failed", "open_reasoning", "open_text",
        "run_id",
    )  # fmt: skip

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.open_text: str | None = None
        self.open_reasoning: str | None = None
        self.calls: dict[object, tuple[str, str, str]] = {}
        """The streaming AI message's tool calls by index: call id, tool name, input so far."""
        self.calls_of: str | None = None
        """The id of the message `calls` belong to."""
        self.announced: set[str] = set()
        """Ids of the calls whose input was sent: only those can be given an output."""
        self.failed = False
        self.ended = False

    def render(self, entries: list[Entry]) -> bytes:
        """The parts of `entries`, up to the run's `end`, in one chunk."""
        out: list[bytes] = []
        for entry in entries:
            if entry.is_end:
                self.ended = True
                break
            if entry.name == "messages":
                self._message(out, entry.data)
            elif entry.name == "custom":
                out.append(_data_part(codec.json_loads(entry.data)))
            elif entry.name == "error":
                self.failed = True
                out.append(_error_part(entry.data))
        return b"".join(out)

    def finish(self, stopped: bool = False) -> bytes:
        """What closes the parts still open at the run's end (`stopped`: by a cancel)."""
        out: list[bytes] = []
        self._close_calls(out, stopped)
        self._close_reasoning(out)
        self._close_text(out)
        return b"".join(out)

    def offer(self, entries: list[Entry], write: Callable[[bytes], bool]) -> bool:
        """Render `entries` and `write` them; if the write is refused, the state is as before,
        so the reader renders them again when it takes them itself."""
        before = self.open_text, self.open_reasoning, self.failed, self.ended, self.calls_of
        calls, announced = dict(self.calls), set(self.announced)
        frames = self.render(entries)
        if frames and not write(frames):
            self.open_text, self.open_reasoning, self.failed, self.ended, self.calls_of = before
            self.calls, self.announced = calls, announced
            return False
        return True

    def _message(self, out: list[bytes], data: bytes) -> None:
        chunk, _meta = codec.json_loads(data)
        kind = chunk.get("type")
        if kind == "tool":
            self._tool_output(out, chunk)
            return
        if kind not in ("AIMessageChunk", "ai"):
            return
        msg_id = str(chunk.get("id") or self.run_id)
        if self.calls and self.calls_of != msg_id:
            self._close_calls(out)
        content = chunk.get("content")
        thought = ""
        if isinstance(content, list):
            content, thought = _blocks(content)
        if thought:
            if self.open_reasoning != msg_id:
                self._close_reasoning(out)
                self.open_reasoning = msg_id
                out.append(_part({"type": "reasoning-start", "id": msg_id}))
            out.append(_part({"type": "reasoning-delta", "id": msg_id, "delta": thought}))
        if content:
            self._close_reasoning(out)  # the model has stopped thinking aloud
            if self.open_text != msg_id:
                self._close_text(out)
                self.open_text = msg_id
                out.append(_part({"type": "text-start", "id": msg_id}))
            out.append(_part({"type": "text-delta", "id": msg_id, "delta": content}))
        if kind == "AIMessageChunk":
            for call in chunk.get("tool_call_chunks") or ():
                self._call_chunk(out, msg_id, call)
            if chunk.get("chunk_position") == "last":
                self._close_calls(out)
        else:  # a whole message: its calls are whole too
            for call in chunk.get("tool_calls") or ():
                call_id, name = call.get("id"), call.get("name")
                if call_id and name:
                    self._announce(out, str(call_id), str(name))
                    out.append(_tool("tool-input-available", str(call_id), toolName=str(name),
                                     input=call.get("args") or {}))  # fmt: skip

    def _announce(self, out: list[bytes], call_id: str, name: str) -> None:
        self.announced.add(call_id)
        out.append(_tool("tool-input-start", call_id, toolName=name))

    def _call_chunk(self, out: list[bytes], msg_id: str, chunk: dict[str, Any]) -> None:
        index = chunk.get("index")
        key = chunk.get("id") if index is None else index
        call = self.calls.get(key)
        if call is None:
            call_id, name = chunk.get("id"), chunk.get("name")
            if not call_id or not name:
                return  # arguments of a call that never started: nothing to add them to
            call = (str(call_id), str(name), "")
            self.calls_of = msg_id
            self._announce(out, call[0], call[1])
        args = chunk.get("args")
        if isinstance(args, str) and args:
            call = (call[0], call[1], call[2] + args)
            out.append(_part({"type": "tool-input-delta", "toolCallId": call[0],
                              "inputTextDelta": args}))  # fmt: skip
        self.calls[key] = call

    def _close_calls(self, out: list[bytes], stopped: bool = False) -> None:
        """The streamed calls' whole input, now that the AI message they belong to is complete;
        or, when the run was `stopped` first, their end as calls that never ran."""
        for call_id, name, text in self.calls.values():
            try:
                value: Any = codec.json_loads(text) if text.strip() else {}
                error = _STOPPED if stopped else None
            except ValueError:
                value, error = text, _STOPPED if stopped else _NOT_JSON
            if error is None:
                out.append(_tool("tool-input-available", call_id, toolName=name, input=value))
            else:
                out.append(_tool("tool-input-error", call_id, toolName=name, input=value,
                                 errorText=error))  # fmt: skip
        self.calls = {}
        self.calls_of = None

    def _close_reasoning(self, out: list[bytes]) -> None:
        if self.open_reasoning is not None:
            out.append(_part({"type": "reasoning-end", "id": self.open_reasoning}))
            self.open_reasoning = None

    def _close_text(self, out: list[bytes]) -> None:
        if self.open_text is not None:
            out.append(_part({"type": "text-end", "id": self.open_text}))
            self.open_text = None

    def _tool_output(self, out: list[bytes], chunk: dict[str, Any]) -> None:
        self._close_calls(out)
        call_id = chunk.get("tool_call_id")
        if call_id not in self.announced:
            return  # the client has no such call to put it in
        content = chunk.get("content")
        if chunk.get("status") == "error":
            text = content if isinstance(content, str) else codec.json_bytes(content).decode()
            out.append(_tool("tool-output-error", call_id, errorText=text))
        else:
            out.append(_tool("tool-output-available", call_id, output=content))


def _data_part(value: Any) -> bytes:
    """A custom event (the graph's `get_stream_writer()`) as a data part: `data-<type>` for a
    dict with a string `type`, kept in the message when it has an `id` too (a later part with the
    same id replaces it) and passed to `onData` only otherwise; anything else, `data-custom`,
    passed to `onData` only."""
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str) or not kind:
        return _part({"type": "data-custom", "data": value, "transient": True})
    part: dict[str, Any] = {"type": f"data-{kind}", "data": value}
    if isinstance(value.get("id"), str):
        part["id"] = value["id"]
    else:
        part["transient"] = True
    return _part(part)


def _blocks(blocks: list[Any]) -> tuple[str, str]:
    """The text and the reasoning of a message's content blocks: LangChain's `reasoning`
    blocks (their text, or their summaries' as OpenAI's carry it) and Anthropic's `thinking`."""
    text: list[str] = []
    thought: list[str] = []
    for block in blocks:
        if isinstance(block, str):
            text.append(block)
        elif not isinstance(block, dict):
            continue
        elif block.get("type") in ("reasoning", "thinking"):
            value = block.get("reasoning", block.get("thinking"))
            if isinstance(value, str):
                thought.append(value)
            for summary in block.get("summary") or ():
                if isinstance(summary, dict):
                    thought.append(str(summary.get("text", "")))
        else:
            text.append(str(block.get("text", "")))
    return "".join(text), "".join(thought)


_NOT_JSON = "the tool call's arguments are not valid JSON"
_STOPPED = "the run was stopped before the tool call's arguments were complete"


def _tool(kind: str, call_id: str, **fields: Any) -> bytes:
    """A part of a graph's tool call: a dynamic tool (the client does not declare it) that the
    server runs (`providerExecuted`)."""
    return _part({"type": kind, "toolCallId": call_id, **fields, "dynamic": True,
                  "providerExecuted": True})  # fmt: skip


async def ui_parts(
    svc: Services, run_id: str, writer: LiveWriter | None = None, first: Prefetched | None = None
) -> AsyncIterator[bytes]:
    """The run's events, from its start, as UI message stream parts: a page of history or a
    live batch in one write. With `writer`, live batches that reach it while it waits are
    written by it from the fan-out's turn (as for classic streams) rather than yielded;
    `first`, the run's first page read before (`start_streamed`), spares reading it."""
    yield _part({"type": "start", "messageId": f"msg-{run_id}"})
    ui = UIParts(run_id)

    deliver: Callable[[Batch], bool] | None = None
    if writer is not None:

        def deliver(batch: Batch) -> bool:
            return ui.offer(batch, writer.write)  # `write` is set once headers are sent

    async with svc.fanout.subscribe(run_id) as live:
        rows, complete = None, False
        if first is not None:
            rows, complete = first.rows, first.complete(ZERO_ID, live.joined)
        tail = svc.log.tail_pages(
            run_id, ZERO_ID, live, idle_seconds=svc.settings.heartbeat_seconds,
            first=rows, first_complete=complete, deliver=deliver,
        )  # fmt: skip
        async for item in tail:
            if item is None:
                yield HEARTBEAT
                continue
            if isinstance(item, Gap):
                # Trimmed history (MAXLEN): say so rather than stream a reply with a hole.
                telemetry.GAPS.inc()
                yield _error_part(gap_payload(item))
                continue
            frames = ui.render(item.entries() if isinstance(item, History) else item)
            if frames:
                yield frames
            if ui.ended:
                break
    stopped = not ui.failed and (await svc.runs.get(run_id)).status is RunStatus.INTERRUPTED
    closing = ui.finish(stopped)
    if closing:
        yield closing
    if not ui.failed:
        yield _part({"type": "abort" if stopped else "finish"})
    yield format_data(DONE)


def ui_stream(
    svc: Services, thread_id: str, run_id: str, first: Prefetched | None = None
) -> EventStreamResponse:
    headers = {
        **UI_STREAM_HEADERS,
        "Location": f"/ai/chat/{id_in_path(thread_id)}/stream",
        "Content-Location": f"/threads/{id_in_path(thread_id)}/runs/{run_id}",
    }
    writer = LiveWriter()
    body = ui_parts(svc, run_id, writer, first)
    return EventStreamResponse(body, headers, abort=svc.draining, live_writer=writer)


async def _mine(who: Caller, chat_id: str, op: str = "read", **value: Any) -> bool:
    try:
        return await who.visible(chat_id, op, **value)
    except NotFound:
        return False


@router.post("/chat")
async def chat(
    body: ChatRequest, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> EventStreamResponse:
    last = body.messages[-1]
    if last.role != "user":
        raise InvalidBody("the last message must be the user's")
    assistant = body.assistant_id or next(iter(svc.registry.specs))
    run_body = RunCreate(
        assistant_id=assistant,
        input={"messages": [{"role": "user", "content": last.text(), "id": last.id}]},
        stream_mode=["messages-tuple", "custom"],
        multitask_strategy="interrupt",
        if_not_exists="create",
    )
    run, first = await start_streamed(svc, body.id, run_body, who)
    return ui_stream(svc, run.thread_id, run.run_id, first)


@router.get("/chat/{chat_id}/stream", response_model=None)
async def resume_chat(
    chat_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> EventStreamResponse | Response:
    # Someone else's chat is answered as a missing one: nothing to resume.
    run_id = await svc.runs.active_run(chat_id) if await _mine(who, chat_id) else None
    if run_id is None:
        return Response(status_code=204)
    return ui_stream(svc, chat_id, run_id)


@router.post("/chat/{chat_id}/stop")
async def stop_chat(
    chat_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    """Cancel the chat's active run; its partial reply stays in the thread."""
    mine = await _mine(who, chat_id, "update", action=CancelAction.INTERRUPT.value)
    run_id = await svc.runs.active_run(chat_id) if mine else None
    if run_id is None:
        return {"stopped": None}
    run = await svc.runs.get(run_id)
    await cancel_run(svc, run, CancelAction.INTERRUPT)
    return {"stopped": run_id}
