"""A client of its own for timed requests: `bench.loadgen.ProbeClient` starts it and sends it one
JSON request per line on stdin; it answers each, in any order, with ``{"id": ..., "ms": ...}``
(or ``"error"``) on stdout, running them concurrently on an event loop nothing else loads.

Requests (`op`): ``hello`` (`system`, `url`: the target, first), ``resume`` (`thread_id`,
`run_id`, `cursor`: `bench.loadgen.timed_resume`) and ``cancel`` (`thread_id`, `run_id`:
`bench.loadgen.checked_cancel`).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.loadgen import Target, checked_cancel, timed_resume


async def serve() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        target: Target | None = None

        async def answer(request: dict[str, Any]) -> None:
            reply: dict[str, Any] = {"id": request["id"]}
            try:
                assert target is not None, "hello first"
                if request["op"] == "resume":
                    ms = await timed_resume(target, request["thread_id"], request["run_id"],
                                            request["cursor"])  # fmt: skip
                elif request["op"] == "cancel":
                    ms = await checked_cancel(target, request["thread_id"], request["run_id"])
                else:
                    raise ValueError(f"unknown op {request['op']!r}")
                reply["ms"] = ms
            except Exception as exc:  # reported to the scenario, which fails with it
                reply["error"] = f"{type(exc).__name__}: {exc}"
            sys.stdout.buffer.write(orjson.dumps(reply) + b"\n")
            sys.stdout.buffer.flush()

        async for line in stdin:
            request = orjson.loads(line)
            if request["op"] == "hello":
                target = Target(request["system"], request["url"], session)
                sys.stdout.buffer.write(orjson.dumps({"id": request["id"], "ms": 0}) + b"\n")
                sys.stdout.buffer.flush()
                continue
            task = asyncio.create_task(answer(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    uvloop.run(serve())
