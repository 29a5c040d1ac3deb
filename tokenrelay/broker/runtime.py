"""Process-wide tuning shared by the API and the worker."""

from __future__ import annotations

import gc

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
