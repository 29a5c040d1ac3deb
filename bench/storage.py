"""Redis bytes per retained token against wire bytes per token, for `messages-tuple` streams.

Streams one 2000-token demo run through `tokenrelay dev` on a throwaway Redis, counts the SSE
bytes a client receives, and reads MEMORY USAGE of the run's stream and its metadata blobs.

    python -m bench.storage [--tokens 2000]
"""

from __future__ import annotations

import argparse
import asyncio

import httpx

from bench.server import dev_server
from tokenrelay.broker.connection import connect
from tokenrelay.broker.keys import Keys


async def measure(url: str, redis_url: str) -> tuple[int, int, int]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        tid = (await client.post("/threads", json={})).json()["thread_id"]
        body = {
            "assistant_id": "agent",
            "input": {"messages": [{"role": "user", "content": "measure me"}]},
            "stream_mode": "messages-tuple",
        }
        wire = tokens = 0
        run_path = ""
        async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
            run_path = r.headers["content-location"]
            async for line in r.aiter_lines():
                wire += len(line) + 1
                tokens += line.startswith("event: messages")
    run_id = run_path.rsplit("/", 1)[1]
    redis = connect(redis_url)
    keys = Keys()
    stored = (await redis.memory_usage(keys.run_events(run_id)) or 0) + (
        await redis.memory_usage(keys.run_blobs(run_id)) or 0
    )
    await redis.aclose()
    return wire, stored, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    with dev_server(
        TOKENRELAY_DEMO_REPLY_WORDS=str(args.tokens), TOKENRELAY_DEMO_TOKEN_DELAY_MS="0"
    ) as (url, redis_url):
        wire, stored, tokens = asyncio.run(measure(url, redis_url))
    print(f"tokens: {tokens}")
    print("| wire bytes / token | Redis bytes / token | Redis / wire |\n|---:|---:|---:|")
    print(f"| {wire / tokens:.0f} | {stored / tokens:.0f} | {stored / wire:.3f} |")


if __name__ == "__main__":
    main()
