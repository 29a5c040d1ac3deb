"""Process-wide tuning and task handling shared by the API and the worker."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tokenrelay.heap")

GC_THRESHOLDS = (10_000, 2, 2500)
"""The generational collector's thresholds where `HeapGuard` gives the heap back to it: young
objects every 10,000 allocations, the middle generation every second time (a run's chunks
survive into it: collected every 50th time, it held half a million of them and paused the
process ~150 ms every few seconds), the whole heap every 5,000 young collections."""

HEAP_GROWTH = 2.0
"""`HeapGuard` collects the heap, at the process's next quiet moment, once it holds this many
times the pymalloc blocks it held after the last collection..."""
HEAP_GROWTH_FLOOR = 1_000_000
"""... and at least this many blocks more (some 60 to 100 MB), so a small heap growing with its
load is not walked again and again. A heap that holds only live runs grows so only while its
load does; one that makes garbage cycles is found out at its first collection."""
HEAP_HARD_GROWTH = 4.0
"""It collects at once, busy or not, past this many times..."""
HEAP_HARD_FLOOR = 4_000_000
"""... and this many blocks more: a walk of the heap stops every stream of the process (2.5
million blocks took 1 s under load), so it waits for a quiet moment unless the heap has grown
this far, which bounds what garbage cycles can take before they are found."""
HEAP_COLLECT_SECONDS = 600.0
"""It also collects at the first quiet moment this long after the last collection, grown or not:
cyclic garbage may hold sockets or files, not only memory."""
HEAP_CHECK_SECONDS = 1.0
"""How often the guard looks at the heap's size (a walk over pymalloc's pools: well under a ms)."""
CYCLIC_SHARE = 0.01
"""A process whose collection finds more objects in garbage cycles than this share of its heap's
blocks makes cycles as it works: the generational collector gets the heap back for good."""


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


class HeapGuard:
    """Cyclic garbage collection fitted to a streaming process: no generational collections,
    and a full one at a quiet moment (`busy` false: the worker runs no run) once the heap has
    grown (`HEAP_GROWTH`) or `HEAP_COLLECT_SECONDS` after the last, and at once if it has grown
    far (`HEAP_HARD_GROWTH`).

    Nearly everything a run allocates is freed by reference counting: its token chunks live as
    long as the run (the chat model keeps every chunk until its reply is whole), then go at
    once, and almost none is in a cycle (`gc.callbacks` under the bench's paced load: about
    1,600 objects found in cycles over 370,000 tokens). The generational collector nevertheless
    examined each surviving chunk once or twice on its way to the old generation: 12.6% of
    the worker's CPU, in pauses of 2 ms (young) to 70 ms (middle) that held back every stream at
    once. What was loaded at start is frozen (`gc.freeze`: never examined again); the rest is
    collected whole, rarely. A process that turns out to make cycles as it works (a graph's
    tools may) gets the generational collector back at its first collection (`CYCLIC_SHARE`).
    A collection asked for otherwise (`gc.collect()`) runs as usual.
    """

    def __init__(
        self,
        *,
        growth: float = HEAP_GROWTH,
        floor: int = HEAP_GROWTH_FLOOR,
        hard_growth: float = HEAP_HARD_GROWTH,
        hard_floor: int = HEAP_HARD_FLOOR,
        every: float = HEAP_CHECK_SECONDS,
        longest: float = HEAP_COLLECT_SECONDS,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._growth = growth
        self._floor = floor
        self._hard_growth = hard_growth
        self._hard_floor = hard_floor
        self._every = every
        self._longest = longest
        self._busy = busy
        self._limit = 0
        self._hard_limit = 0
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.collections = 0
        """Full collections this guard ran."""

    def start(self) -> HeapGuard:
        """Collect and freeze what is loaded so far, then guard the heap from this event loop."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        gc.disable()
        self._next()
        self._timer = asyncio.get_running_loop().call_later(self._every, self._tick)
        return self

    @property
    def guarding(self) -> bool:
        """Whether the generational collector is still kept off."""
        return not self._closed

    def close(self) -> None:
        """Give the heap back to the generational collector."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.enable()

    def check(self) -> bool:
        """Run a full collection if the heap has grown past its hard limit, or, while the
        process is not `busy`, past its limit or the last one is old; whether one ran."""
        blocks = sys.getallocatedblocks()
        due = blocks > self._limit or time.monotonic() > self._due
        if blocks > self._hard_limit or (due and not self._busy()):
            self.collect()
            return True
        return False

    def collect(self) -> None:
        """Collect the whole heap (but what was frozen at start) and set the next limit."""
        blocks = sys.getallocatedblocks()
        started = time.perf_counter()
        found = gc.collect()
        took = time.perf_counter() - started
        self._next()
        self.collections += 1
        log.debug("heap collected: %d objects in cycles, %d blocks, %.0f ms", found, blocks,
                  took * 1000)  # fmt: skip
        if found > CYCLIC_SHARE * blocks and not self._closed:
            log.info(
                "%d of this process's objects were in garbage cycles (of %d blocks): the "
                "generational collector takes the heap back", found, blocks,
            )  # fmt: skip
            self.close()

    def _next(self) -> None:
        blocks = sys.getallocatedblocks()
        self._limit = max(int(blocks * self._growth), blocks + self._floor)
        self._hard_limit = max(int(blocks * self._hard_growth), blocks + self._hard_floor)
        self._due = time.monotonic() + self._longest

    def _tick(self) -> None:
        self.check()
        if not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self._every, self._tick)


def settle_heap() -> None:
    """Take what was loaded at start (modules, compiled graphs) out of the collector's sight and
    collect young objects less often (`GC_THRESHOLDS`): for a process that makes garbage cycles
    as it works, as the API does (uvicorn leaves each closed connection's protocol, transport
    and request cycle in one). The worker, which makes almost none, uses `HeapGuard`."""
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
