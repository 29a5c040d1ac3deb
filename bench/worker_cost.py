"""The worker's publishing, per flush and per token, counted in instructions rather than seconds.

The real `Publisher` and `EventLog` on a throwaway redis-server: `--runs` runs with one token
each per flush, as at the suite's paced load, where a flush carries a token or two of each of
many runs: the round trip, the script call's arguments, the bookkeeping.

With `valgrind` on PATH the flushes run under callgrind twice, at two sizes, and the difference
is divided by the difference in flushes: start-up and imports cancel out, and the count is the
same from one run to the next whatever else the machine is doing (the children run with a
fixed hash seed and without the cycle collector, whose work depends on timing). Without
valgrind (or with `--cpu`) the same difference is taken of CPU seconds, which a shared machine
makes noisy.

    python -m bench.worker_cost [--runs 12] [--flushes 200 600]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUN_PREFIX = "01a24b4c-cfea-7f2e-a56a-"
# About what a LangChain chat chunk's invariant part and its metadata encode to.
BLOB = (
    b'"additional_kwargs":{},"response_metadata":{},"type":"AIMessageChunk","name":null,'
    b'"id":"lc_run--01a24b42-c6b7-7502-82bf-a6548d72b17f","tool_calls":[],'
    b'"invalid_tool_calls":[],"usage_metadata":null,"tool_call_chunks":[],'
    b'"chunk_position":null},{"langgraph_step":1,"langgraph_node":"llm",'
    b'"langgraph_triggers":["branch:to:llm"],"langgraph_path":["__pregel_pull","llm"],'
    b'"langgraph_checkpoint_ns":"llm:1e38be84-c48b-0292-84fe-b2857eacdf4f",'
    b'"ls_provider":"fake","ls_model_type":"chat","lc_versions":{"langchain-core":"1"}}'
)


async def publish(url: str, runs: int, flushes: int) -> None:
    """`flushes` flushes of one token for each of `runs` runs, each awaited."""
    from tokenrelay.broker.connection import connect
    from tokenrelay.broker.keys import Keys
    from tokenrelay.broker.log import EventLog
    from tokenrelay.broker.models import Event
    from tokenrelay.producer.publisher import Publisher, Reply, _Pending

    redis = connect(url)
    log = EventLog(redis, Keys("tr"), maxlen=100_000, ttl_seconds=3600)
    await log.load_scripts()
    written = asyncio.Event()

    class Counted(Publisher):
        async def _write(self, batch: dict[str, _Pending]) -> dict[str, Reply]:
            out = await super()._write(batch)
            asyncio.get_running_loop().call_soon(written.set)
            return out

    publisher = Counted(redis, log, flush_ms=0, max_events=10**9)
    publisher.start()
    ids = [f"{RUN_PREFIX}{i:012d}" for i in range(runs)]
    for run_id in ids:
        publisher.begin_run(run_id, 0)
    token = b'"ts1796559042661 du1796559042661 n12 xxxxxxxxxxxxxxxx"'
    for _ in range(flushes):
        for run_id in ids:
            publisher.emit(run_id, Event("messages", token, blob=BLOB, content_only=True))
        written.clear()
        await written.wait()
    await publisher.stop()
    await redis.aclose()


def _child(args: list[str], callgrind: bool) -> int | float:
    """Run this module with `args` in a child process: its instructions under callgrind, or
    its CPU seconds."""
    cmd = [sys.executable, "-m", "bench.worker_cost", "--child", *args]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts, run after run
    if not callgrind:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return float(out.split()[-1])
    with tempfile.TemporaryDirectory() as scratch:
        out_file = Path(scratch) / "callgrind.out"
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]
        subprocess.run([*vg, *cmd], check=True, capture_output=True, env=env)
        found = re.search(r"^(?:summary|totals): (\d+)", out_file.read_text(), re.M)
        if found is None:
            raise RuntimeError("callgrind wrote no total")
        return int(found.group(1))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tokenrelay.broker.embedded import EmbeddedRedis

    callgrind = shutil.which("valgrind") is not None and not args.cpu
    unit = "instructions" if callgrind else "cpu_seconds"
    out: dict[str, Any] = {"unit": unit, "runs_per_flush": args.runs}
    redis = EmbeddedRedis().start()
    try:
        small, large = args.flushes
        counts = [
            _child(["publish", redis.url, str(args.runs), str(n)], callgrind)
            for n in (small, large)
        ]
        per_flush = (counts[1] - counts[0]) / (large - small)
        out["publish"] = {"per_flush": per_flush, "per_token": per_flush / args.runs}
    finally:
        redis.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        # No cycle collections: how much work they find depends on when they run and how much
        # is alive, which differencing two sizes does not cancel. What is counted is the code's
        # own work per flush.
        gc.disable()
        t0 = time.process_time()
        import uvloop

        uvloop.run(publish(argv[2], int(argv[3]), int(argv[4])))
        print(time.process_time() - t0)
        return
    parser = argparse.ArgumentParser(prog="python -m bench.worker_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=12, help="runs per flush")
    parser.add_argument("--flushes", type=int, nargs=2, default=[200, 600])
    parser.add_argument("--cpu", action="store_true", help="CPU seconds even with valgrind")
    result = measure(parser.parse_args(argv))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENRELAY_LOG_LEVEL", "warning")
    main()
