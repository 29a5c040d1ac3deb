"""The raw ceiling: uvicorn streaming events generated in its own process, no Redis, no storage.

Every reader gets its own generator on the stream's schedule, so this is what the HTTP server
and the event framing alone cost.

    python -m bench.peers.raw --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.pacing import Pace

HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}

# Background streams: id -> (pace, monotonic start). Readers replay the schedule from it.
streams: dict[str, tuple[Pace, float]] = {}


def event(i: int, pace: Pace, due: float) -> bytes:
    data = orjson.dumps({"i": i, "content": pace.token(i, due)})
    return b"id: %d\ndata: %s\n\n" % (i, data)


async def generate(pace: Pace, t0: float, after: int) -> AsyncIterator[bytes]:
    for i, due in enumerate(pace.schedule(t0)):
        if i <= after:
            continue
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        elif i % 64 == 0:
            await asyncio.sleep(0)
        yield event(i, pace, due)
    yield b"data: [DONE]\n\n"


def sse(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)


async def create(request: Request) -> Response:
    pace = Pace.from_json(request.query_params)
    return sse(generate(pace, time.monotonic(), -1))


async def background(request: Request) -> Response:
    stream_id = request.path_params["id"]
    streams[stream_id] = (Pace.from_json(request.query_params), time.monotonic())
    return JSONResponse({"id": stream_id}, status_code=202)


async def join(request: Request) -> Response:
    found = streams.get(request.path_params["id"])
    if found is None:
        return JSONResponse({"detail": "no such stream"}, status_code=404)
    after = int(request.headers.get("last-event-id", "-1"))
    return sse(generate(found[0], found[1], after))


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        Route("/streams/{id}", create, methods=["POST"]),
        Route("/streams/{id}/background", background, methods=["POST"]),
        Route("/streams/{id}", join, methods=["GET"]),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
