"""The graph's own cost: the suite's paced chat graph (bench/graphs.py) run by LangGraph's
`astream` in one process, no relay, no HTTP, no Redis: the CPU per token that any server
running this graph pays, which the relay's total is compared with.

    echo '{"streams": 100, "pace": {"tokens": 200, "interval_ms": 50}}' | python -m bench.astream
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from bench.graphs import paced
from bench.loadgen import answer
from bench.pacing import TS, Pace


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    pace = Pace.from_json(spec["pace"])
    n = int(spec["streams"])
    ramp = float(spec.get("ramp_seconds", 0.0))
    graph = paced()
    content = orjson.dumps(pace.params()).decode()
    counts = [0] * n

    async def one(i: int) -> None:
        await asyncio.sleep(ramp * i / n)
        body = {"messages": [{"role": "user", "content": content}]}
        async for chunk, _ in graph.astream(body, stream_mode="messages"):
            text = getattr(chunk, "content", "")
            if isinstance(text, str) and TS.search(text.encode()):
                counts[i] += 1

    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    tokens = sum(counts)
    return {
        "streams": n,
        "tokens": tokens,
        "expected_tokens": n * pace.tokens,
        "wall_seconds": wall,
        "cpu_percent": {"total": 100 * cpu / wall},
        "cpu_seconds": {"total": cpu},
        "cpu_us_per_token": {"total": 1e6 * cpu / tokens if tokens else None},
        "tokens_per_cpu_second": tokens / cpu if cpu else None,
    }


if __name__ == "__main__":
    answer(run)
