"""The Vercel AI SDK's UI message stream protocol (v1), for ``useChat({resume: true})``.

A chat is a thread (chat id = thread id). ``POST /ai/chat`` starts a run with the last user
message and streams it as UI message parts; ``GET /ai/chat/{id}/stream`` replays the chat's
active run from its ``start`` part and goes live (204 when nothing is active); ``POST
/ai/chat/{id}/stop`` cancels it, keeping the partial reply in the thread.
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
    """Turns a run's entries into UI message stream parts. What a reader carries from one entry
    to the next: the text part it has open, whether the run failed and whether it ended."""

    __slots__ = ("ended", "failed", "open_text", "run_id")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.open_text: str | None = None
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
                self._text(out, entry.data)
            elif entry.name == "error":
                self.failed = True
                out.append(_error_part(entry.data))
        return b"".join(out)

    def offer(self, entries: list[Entry], write: Callable[[bytes], bool]) -> bool:
        """Render `entries` and `write` them; if the write is refused, the state is as before,
        so the reader renders them again when it takes them itself."""
        before = self.open_text, self.failed, self.ended
        frames = self.render(entries)
        if frames and not write(frames):
            self.open_text, self.failed, self.ended = before
            return False
        return True

    def _text(self, out: list[bytes], data: bytes) -> None:
        chunk, _meta = codec.json_loads(data)
        if chunk.get("type") not in ("AIMessageChunk", "ai"):
            return
        content = chunk.get("content")
        if isinstance(content, list):
            content = "".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
        if not content:
            return
        msg_id = str(chunk.get("id") or self.run_id)
        if self.open_text != msg_id:
            if self.open_text is not None:
                out.append(_part({"type": "text-end", "id": self.open_text}))
            self.open_text = msg_id
            out.append(_part({"type": "text-start", "id": msg_id}))
        out.append(_part({"type": "text-delta", "id": msg_id, "delta": content}))


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
    if ui.open_text is not None:
        yield _part({"type": "text-end", "id": ui.open_text})
    if not ui.failed:
        run = await svc.runs.get(run_id)
        if run.status is RunStatus.INTERRUPTED:
            yield _part({"type": "abort"})
        else:
            yield _part({"type": "finish"})
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
        stream_mode=["messages-tuple"],
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
