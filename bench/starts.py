"""CPU per run start: what starting one short streamed run costs the API and the worker.

Starts tokenrelay (one API process, one worker, a throwaway redis-server) as the suite does,
then in each round starts `runs` stateless runs (`POST /runs/stream`, the SDKs'
`runs.stream` without a thread), `concurrency` at a time, each a one-token paced run read
to its end. The figures are each process's CPU time over the round divided by the runs, and
the time from the request to the stream's first token (p50 and p99 over the round).

    python -m bench.starts [--runs 500] [--concurrency 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp
import psutil
import uvloop

from bench.joins import cpu_seconds
from bench.pacing import TS, Pace
from bench.suite import warm_up
from bench.systems import start


async def one_round(url: str, runs: int, concurrency: int) -> list[float]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    pace = Pace(tokens=1, interval_ms=0)
    body = {
        "assistant_id": "paced",
        "input": {"messages": [{"role": "user", "content": json.dumps(pace.params())}]},
        "stream_mode": ["messages-tuple"],
    }
    firsts: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one() -> None:
            async with gate:
                t0 = time.perf_counter()
                async with http.post(f"{url}/runs/stream", json=body) as r:
                    r.raise_for_status()
                    first = None
                    async for chunk in r.content.iter_any():
                        if first is None and TS.search(chunk):
                            first = time.perf_counter() - t0
                    if first is None:
                        raise RuntimeError("a run streamed no token")
                    firsts.append(first * 1000)

        await asyncio.gather(*(one() for _ in range(runs)))
    return firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with start("tokenrelay") as system:
        warm_up(system)
        procs: dict[str, psutil.Process] = {"api": system.server, **system.others}
        for n in range(args.rounds):
            before = {k: cpu_seconds(p) for k, p in procs.items()}
            wall = time.monotonic()
            firsts = sorted(uvloop.run(one_round(system.url, args.runs, args.concurrency)))
            wall = time.monotonic() - wall
            per: dict[str, Any] = {
                k: round(1e6 * (cpu_seconds(p) - before[k]) / args.runs) for k, p in procs.items()
            }
            p99 = firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))]
            p50 = statistics.median(firsts)
            print(f"round {n}: {args.runs / wall:.0f} runs/s, CPU per run (µs) {per}, "
                  f"first token p50 {p50:.1f} ms p99 {p99:.1f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
