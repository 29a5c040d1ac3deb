"""Processes of one machine sharing a fresh SQLite checkpointer file."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

from tokenrelay.broker.graphs import open_checkpointer

PROCESSES, FILES, SLOT = 8, 60, 0.04


def _open_each_file(folder: str, t0: float, n: int) -> None:
    """Open every file of the folder in its time slot, all processes together, and write one
    checkpoint to it."""

    async def main() -> None:
        for i in range(FILES):
            while time.time() < t0 + i * SLOT:
                pass
            async with open_checkpointer(f"sqlite:///{folder}/f{i}.sqlite") as saver:
                config = {"configurable": {"thread_id": f"t{n}", "checkpoint_ns": ""}}
                checkpoint = {
                    "v": 1,
                    "id": f"00000000-0000-0000-0000-{n:012d}",
                    "ts": "2026-01-01T00:00:00+00:00",
                    "channel_values": {"n": n},
                    "channel_versions": {},
                    "versions_seen": {},
                }
                await saver.aput(config, checkpoint, {}, {})  # type: ignore[arg-type]

    asyncio.run(main())


def test_processes_set_up_one_fresh_file_together(tmp_path: Path) -> None:
    """Processes opening a fresh file at the same moment (as `worker --processes N` and
    `tokenrelay dev` do): none fails with 'database is locked', and every write is there."""
    ctx = multiprocessing.get_context("fork")
    t0 = time.time() + 1.0
    procs = [
        ctx.Process(target=_open_each_file, args=(str(tmp_path), t0, n)) for n in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES

    async def count(i: int) -> int:
        async with open_checkpointer(f"sqlite:///{tmp_path}/f{i}.sqlite") as saver:
            return len([c async for c in saver.alist(None)])

    assert [asyncio.run(count(i)) for i in range(FILES)] == [PROCESSES] * FILES


async def test_the_shared_file_is_in_wal_mode_and_syncs_at_checkpoints(tmp_path: Path) -> None:
    async with open_checkpointer(f"sqlite:///{tmp_path}/c.sqlite") as saver:
        conn = saver.conn
        async with conn.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone()) == ("wal",)
        async with conn.execute("PRAGMA synchronous") as cur:
            assert (await cur.fetchone()) == (1,)  # NORMAL
