"""API CPU per join or resume: what one reader reconnecting with Last-Event-ID costs the API.

Starts tokenrelay (one API process, one worker, a throwaway redis-server) as the suite does,
makes `runs` live runs (60 tokens at once, then one every 5 s, so history hardly grows), then
`joins` readers resume at once, each with the id of one of a run's first 50 tokens: it reads
its catch-up (the first chunk that carries a token) and hangs up. The figure is the API
process's CPU time over the round divided by the joins: request, lookup, subscription,
catch-up read and formatting, and the hang-up.

    python -m bench.joins [--runs 100] [--joins 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import aiohttp
import psutil
import uvloop

from bench.pacing import Pace
from bench.suite import warm_up
from bench.systems import start


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def watch(http: aiohttp.ClientSession, url: str) -> None:
    """One reader of a run from now on, left open: the run is live in the API process."""
    async with http.get(url) as r:
        async for _ in r.content.iter_any():
            pass


async def measure(
    url: str, api: psutil.Process, runs: int, joins: int, rounds: int, watched: bool
) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        pace = Pace(tokens=100, interval_ms=5000, burst=60)
        content = json.dumps(pace.params())
        body = {
            "assistant_id": "paced",
            "input": {"messages": [{"role": "user", "content": content}]},
            "stream_mode": ["messages-tuple"],
        }

        async def create() -> tuple[str, str]:
            async with http.post(f"{url}/runs", json=body) as r:
                run = await r.json()
                return run["thread_id"], run["run_id"]

        handles = await asyncio.gather(*(create() for _ in range(runs)))
        await asyncio.sleep(3)  # the burst is written
        cursors: list[list[str]] = []
        for tid, rid in handles:
            params = {"after": "0", "limit": "60"}
            async with http.get(f"{url}/threads/{tid}/runs/{rid}/events", params=params) as r:
                found = (await r.json())["events"]
            cursors.append([e["id"] for e in found if e["event"] == "messages"][:50])
        rng = random.Random(16)
        watchers = [
            asyncio.create_task(watch(http, f"{url}/threads/{tid}/runs/{rid}/stream"))
            for tid, rid in handles
            if watched
        ]

        async def resume(i: int, firsts: list[float], t0: float) -> None:
            tid, rid = handles[i % runs]
            headers = {"Last-Event-ID": rng.choice(cursors[i % runs])}
            async with http.get(f"{url}/threads/{tid}/runs/{rid}/stream", headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                async for chunk in r.content.iter_any():
                    if b"ts" in chunk:
                        firsts.append(time.monotonic() - t0)
                        break

        for n in range(rounds):
            await asyncio.sleep(1.0)
            firsts: list[float] = []
            cpu0, t0 = cpu_seconds(api), time.monotonic()
            await asyncio.gather(*(resume(i, firsts, t0) for i in range(joins)))
            wall = time.monotonic() - t0
            await asyncio.sleep(0.5)  # the hang-ups are handled
            cpu = cpu_seconds(api) - cpu0
            firsts.sort()
            result: dict[str, Any] = {
                "round": n,
                "joins": joins,
                "api_cpu_seconds": round(cpu, 3),
                "api_cpu_us_per_join": round(1e6 * cpu / joins),
                "wall_seconds": round(wall, 3),
                "catch_up_p50_ms": round(1000 * firsts[len(firsts) // 2]),
                "catch_up_max_ms": round(1000 * firsts[-1]),
            }
            print(json.dumps(result), flush=True)
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.joins", description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--joins", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--watched", action="store_true",
        help="keep one reader of each run open: resumes join runs live in the API process",
    )  # fmt: skip
    args = parser.parse_args()
    with start("tokenrelay") as system:
        warm_up(system)
        uvloop.run(
            measure(system.url, system.server, args.runs, args.joins, args.rounds, args.watched)
        )


if __name__ == "__main__":
    main()
