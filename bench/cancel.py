"""Cancel latency: from `POST .../cancel?wait=1` sent to its answer, i.e. the run has ended
with its partial message saved in the thread and its fork checkpoint recorded.

Runs `tokenrelay dev` (API + worker in one process) on a throwaway Redis, starts demo runs
streaming at 50 tokens/s from this process, cancels each after a random moment, and reports
p50/p99.

    python -m bench.cancel [--cancels 200] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx

from bench.server import dev_server


async def one_cancel(client: httpx.AsyncClient, rng: random.Random) -> float:
    tid = (await client.post("/threads", json={})).json()["thread_id"]
    body = {
        "assistant_id": "agent",
        "input": {"messages": [{"role": "user", "content": f"q{rng.random()}"}]},
        "stream_mode": ["messages-tuple"],
    }
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body) as r:
        run_id = ""
        seen = 0
        target = rng.randint(3, 40)
        async for line in r.aiter_lines():
            if line.startswith("data: ") and not run_id:
                run_id = line.split('"run_id":"')[1].split('"')[0]
            if line.startswith("event: messages"):
                seen += 1
                if seen >= target:
                    break
        t0 = time.perf_counter()
        resp = await client.post(f"/threads/{tid}/runs/{run_id}/cancel", params={"wait": 1})
        elapsed = time.perf_counter() - t0
    run = resp.json()
    assert run["status"] == "interrupted" and run["checkpoint_id"], run
    return elapsed


async def measure(url: str, cancels: int, concurrency: int) -> list[float]:
    rng = random.Random(7)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def guarded() -> float:
            async with sem:
                return await one_cancel(client, rng)

        return list(await asyncio.gather(*(guarded() for _ in range(cancels))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cancels", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()

    with dev_server() as (url, _redis_url):
        times = asyncio.run(measure(url, args.cancels, args.concurrency))
    ms = sorted(t * 1000 for t in times)
    p50 = statistics.median(ms)
    p99 = ms[max(0, int(len(ms) * 0.99) - 1)]
    print(f"cancels: {len(ms)}, concurrency {args.concurrency}")
    print(
        f"| p50 | p99 | max |\n|---:|---:|---:|\n| {p50:.1f} ms | {p99:.1f} ms | {ms[-1]:.1f} ms |"
    )


if __name__ == "__main__":
    main()
