"""The naive baseline: a FastAPI StreamingResponse per client, each reading the stream with its own
``XREAD BLOCK``; a producer process appending one ``XADD`` per token.

    python -m bench.peers.naive api --port 8002 --redis redis://...
    python -m bench.peers.naive producer --redis redis://...
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from redis.asyncio import BlockingConnectionPool, Redis

from bench.pacing import Pace

JOBS = "naive:jobs"
END = b"end"
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def stream_key(stream_id: str) -> str:
    return f"naive:{stream_id}"


def client(url: str) -> Redis:
    # One connection per blocked reader: that is the baseline's cost.
    # No socket timeout: readers block in XREAD and the producer in BLPOP.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=5000, timeout=30, socket_timeout=None
    )
    return Redis.from_pool(pool)


def make_app(redis_url: str) -> FastAPI:
    app = FastAPI()
    redis = client(redis_url)

    async def enqueue(stream_id: str, request: Request) -> None:
        pace = Pace.from_json(request.query_params)
        await redis.rpush(JOBS, orjson.dumps({"id": stream_id, "pace": pace.params()}))

    async def tail(stream_id: str, after: str) -> AsyncIterator[bytes]:
        key = stream_key(stream_id)
        while True:
            reply = await redis.xread({key: after}, count=100, block=5000)
            if not reply:
                yield b": heartbeat\n\n"
                continue
            for entry_id, fields in reply[0][1]:
                after = entry_id.decode()
                data = fields[b"d"]
                if data == END:
                    yield b"data: [DONE]\n\n"
                    return
                yield b"id: %s\ndata: %s\n\n" % (entry_id, data)

    def sse(body: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": bool(await redis.ping())}

    @app.post("/streams/{stream_id}")
    async def create(stream_id: str, request: Request) -> StreamingResponse:
        await enqueue(stream_id, request)
        return sse(tail(stream_id, "0-0"))

    @app.post("/streams/{stream_id}/background", status_code=202)
    async def background(stream_id: str, request: Request) -> dict[str, str]:
        await enqueue(stream_id, request)
        return {"id": stream_id}

    @app.get("/streams/{stream_id}", response_model=None)
    async def join(
        stream_id: str, last_event_id: str | None = Header(default=None)
    ) -> StreamingResponse | JSONResponse:
        after = last_event_id or "0-0"
        if after in ("-1", "0"):
            after = "0-0"
        return sse(tail(stream_id, after))

    return app


async def produce(redis: Redis, stream_id: str, pace: Pace) -> None:
    key = stream_key(stream_id)
    for i, due in enumerate(pace.schedule(time.monotonic())):
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await redis.xadd(key, {"d": orjson.dumps({"i": i, "content": pace.token(i, due)})})
    await redis.xadd(key, {"d": END})
    await redis.expire(key, 600)


async def serve_producer(redis_url: str) -> None:
    redis = client(redis_url)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        _, raw = await redis.blpop([JOBS])  # type: ignore[misc]
        job = orjson.loads(raw)
        task = asyncio.create_task(produce(redis, job["id"], Pace.from_json(job["pace"])))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["api", "producer"])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    if args.role == "api":
        uvicorn.run(
            make_app(args.redis), host="127.0.0.1", port=args.port, log_level="warning",
            backlog=4096,
        )  # fmt: skip
    else:
        asyncio.run(serve_producer(args.redis))


if __name__ == "__main__":
    main()
