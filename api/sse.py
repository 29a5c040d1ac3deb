"""Server-Sent Events framing: the only place that formats events and heartbeats."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from starlette.responses import StreamingResponse

from broker.models import Entry

HEARTBEAT = b": heartbeat\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


def format_event(entry: Entry) -> bytes:
    """``event: <name>\\ndata: <json>\\nid: <stream id>\\n\\n``, as the Agent Server frames it."""
    return b"event: %s\ndata: %s\nid: %s\n\n" % (
        entry.name.encode(),
        entry.data,
        str(entry.id).encode(),
    )


def format_error(error: str, data: bytes) -> bytes:
    """An `error` event that has no stream id (it was not stored)."""
    del error
    return b"event: error\ndata: %s\n\n" % data


def sse_response(body: AsyncIterator[bytes], headers: Mapping[str, str]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream; charset=utf-8",
        headers={**SSE_HEADERS, **headers},
    )
