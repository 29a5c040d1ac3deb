"""Process-wide tuning and task handling shared by the API and the worker."""

from __future__ import annotations

import asyncio
import gc
import math
import os
from typing import Any

from tokenrelay.broker import codec

GC_THRESHOLDS = (10_000, 2, 2500)
"""Young objects are collected every 10,000 allocations, the middle generation every second
time, and the whole heap every 5,000 young collections, as with (10,000, 50, 100) before.

A run's token chunks live as long as the run (the chat model keeps every chunk until its reply
is whole), so nearly every young object survives into the middle generation; collected only
every 50th time, it held half a million of them and paused the process ~150 ms every few
seconds under load, holding back every stream's tokens at once."""


RECANCEL_SECONDS = 0.25
"""How long `cancel_and_wait` lets a cancelled task unwind before cancelling it again."""


async def cancel_and_wait(
    task: asyncio.Task[Any], every: float = RECANCEL_SECONDS, *, cancelled: bool = False
) -> None:
    """Cancel `task` (unless the caller just did: `cancelled`) and wait for its end, cancelling
    it again each `every` seconds while it runs on; whatever it ends with is taken (not raised
    here).

    A cancellation can be lost: on Python 3.11, `asyncio.wait_for`, which redis-py awaits its
    socket writes with, returns the write's result instead of raising when the cancellation
    lands as the write completes, and the task goes on as if it had never been cancelled. A
    stream body that never ends by itself (a protocol subscription spans runs) would then run,
    and look at Redis each heartbeat, for as long as the process lives. A task still unwinding
    the first cancellation is given `every` seconds before it is cancelled again."""
    if not cancelled:
        task.cancel()
    while True:
        await asyncio.wait({task}, timeout=every)
        if task.done():
            if not task.cancelled():
                task.exception()  # taken: a body failing as it is stopped is not news
            return
        task.cancel()


def settle_heap() -> None:
    """Take what was loaded at start (modules, compiled graphs) out of the collector's sight and
    collect young objects less often (`GC_THRESHOLDS`).

    A streaming process allocates many short-lived objects and almost no cycles; with the
    default thresholds, full collections over the startup heap paused every stream for
    100 ms and more, several times a minute under load. What orjson loads the first time it
    meets an object it does not encode by itself is loaded first (`codec.warm_up`), so that
    the first token of the first run does not wait for it and it is frozen with the rest.
    """
    codec.warm_up()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit), rounded up. `os.cpu_count()` is the host's count: in a pod limited
    to one core on a 64-core node it would start 64 processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
