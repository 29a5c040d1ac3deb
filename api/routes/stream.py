"""Streaming endpoints: start a run and stream it, or join a run's stream with resume."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Query
from starlette.responses import StreamingResponse

from api.deps import Services, services
from api.routes.runs import start_run
from api.schemas import RunCreate
from api.sse import HEARTBEAT, format_event, sse_response
from broker.models import ZERO_ID, StreamId

router = APIRouter(tags=["stream"])


def run_headers(thread_id: str, run_id: str) -> dict[str, str]:
    return {
        "Location": f"/threads/{thread_id}/runs/{run_id}/stream",
        "Content-Location": f"/threads/{thread_id}/runs/{run_id}",
    }


async def run_events(svc: Services, run_id: str, after: StreamId | None) -> AsyncIterator[bytes]:
    """SSE bytes of `run_id` after `after` (None: from now on) until the run ends."""
    async with svc.fanout.subscribe(run_id) as live:
        if after is None:
            last = await svc.log.last_entry(run_id)
            if last is not None and last.is_end:
                return
            after = last.id if last is not None else ZERO_ID
        tail = svc.log.tail(run_id, after, live, idle_seconds=svc.settings.heartbeat_seconds)
        async for entry in tail:
            if entry is None:
                # Idle: a run that ended without us seeing `end` (an id past it) must not hang us.
                if (await svc.runs.get(run_id)).status.terminal and not await svc.log.has_after(
                    run_id, after
                ):
                    return
                yield HEARTBEAT
            elif entry.is_end:
                return
            else:
                after = entry.id
                yield format_event(entry)


@router.post("/threads/{thread_id}/runs/stream")
async def stream_run(
    thread_id: str, body: RunCreate, svc: Services = Depends(services)
) -> StreamingResponse:
    run = await start_run(svc, thread_id, body)
    return sse_response(run_events(svc, run.run_id, ZERO_ID), run_headers(thread_id, run.run_id))


@router.get("/threads/{thread_id}/runs/{run_id}/stream")
async def join_run_stream(
    thread_id: str,
    run_id: str,
    last_event_id_header: str | None = Header(default=None, alias="Last-Event-ID"),
    last_event_id: str | None = Query(default=None),
    svc: Services = Depends(services),
) -> StreamingResponse:
    raw = last_event_id_header if last_event_id_header is not None else last_event_id
    after = StreamId.parse_last_event_id(raw) if raw is not None else None
    await svc.runs.find(thread_id, run_id)
    return sse_response(run_events(svc, run_id, after), run_headers(thread_id, run_id))
