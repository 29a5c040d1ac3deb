"""Redis round trips per streamed token at 50 tokens/s per run.

Runs a real worker against a throwaway redis-server, counting every request the worker's Redis
connections send (a pipeline counts once), while N runs stream 100 tokens each at 50 tokens/s.

    python -m bench.roundtrips [--runs 1 10 100 500] [--flush-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis
from tokenrelay.broker.graphs import GraphRegistry, open_checkpointer
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import RunStatus
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.broker.settings import Settings
from tokenrelay.producer.worker import Worker

WORDS = 100
TOKEN_DELAY_MS = 20  # 50 tokens/s per run


class CountingConnection(Connection):
    """Counts requests sent: one per command, one per pipeline."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


@dataclass
class Result:
    runs: int
    tokens: int
    round_trips: int
    append_round_trips: int
    seconds: float

    @property
    def per_token(self) -> float:
        return self.round_trips / self.tokens

    @property
    def appends_per_token(self) -> float:
        return self.append_round_trips / self.tokens


async def measure(redis_url: str, runs: int, flush_ms: float) -> Result:
    os.environ["BENCH_WORDS"] = str(WORDS)
    os.environ["BENCH_TOKEN_DELAY_MS"] = str(TOKEN_DELAY_MS)
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"b{uuid.uuid4().hex[:6]}",
        graphs={"chat": "bench.graphs:chat"},
        flush_ms=flush_ms,
        worker_concurrency=max(runs, 1),
    )
    pool = ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    counted = Redis(connection_pool=pool)
    driver = connect(redis_url)
    keys = Keys(settings.key_prefix)
    store, queue = RunStore(driver, keys, ttl_seconds=600), RunQueue(driver, keys)
    await queue.ensure_group()
    async with open_checkpointer("memory") as saver:
        worker = Worker(counted, settings, GraphRegistry(settings.graphs, saver))
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop))
        await asyncio.sleep(0.5)
        run_ids = []
        for i in range(runs):
            ts = now_ms()
            run = RunRecord(
                new_id(), new_id(), "chat", RunStatus.PENDING, ts, ts,
                kwargs={"input": {"messages": [{"role": "user", "content": f"q{i}"}]},
                        "stream_mode": ["messages-tuple"]},
            )  # fmt: skip
            await queue.enqueue(await store.create(run))
            run_ids.append(run.run_id)
        CountingConnection.sent = 0
        flushes0 = worker.publisher.flushes
        t0 = time.perf_counter()
        pending = set(run_ids)
        while pending:
            await asyncio.sleep(0.1)
            for rid in list(pending):
                if (await store.get(rid)).status.terminal:
                    pending.discard(rid)
        elapsed = time.perf_counter() - t0
        sent = CountingConnection.sent
        appends = worker.publisher.flushes - flushes0
        stop.set()
        await serving
    await counted.aclose()
    await driver.aclose()
    return Result(runs, runs * WORDS, sent, appends, elapsed)


def table(results: list[Result], flush_ms: float) -> str:
    lines = [
        f"Flush window {flush_ms:g} ms; each run streams {WORDS} tokens at "
        f"{1000 / TOKEN_DELAY_MS:g} tokens/s.",
        "",
        "| concurrent runs | tokens | all worker round trips / token "
        "| append round trips / token |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.runs} | {r.tokens} | {r.per_token:.3f} | {r.appends_per_token:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 10, 100, 500])
    parser.add_argument("--flush-ms", type=float, default=Settings().flush_ms)
    args = parser.parse_args()
    redis = EmbeddedRedis().start()
    try:
        results = [asyncio.run(measure(redis.url, n, args.flush_ms)) for n in args.runs]
    finally:
        redis.stop()
    print(table(results, args.flush_ms))


if __name__ == "__main__":
    main()
