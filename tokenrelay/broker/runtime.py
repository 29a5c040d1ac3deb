"""Process-wide tuning shared by the API and the worker."""

from __future__ import annotations

import gc
import math
import os

GC_THRESHOLDS = (10_000, 50, 100)


def settle_heap() -> None:
    """Take what was loaded at start (modules, compiled graphs) out of the collector's sight and
    collect young objects less often.

    A streaming process allocates many short-lived objects and almost no cycles; with the
    default thresholds, full collections over the startup heap paused every stream for
    100 ms and more, several times a minute under load.
    """
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
