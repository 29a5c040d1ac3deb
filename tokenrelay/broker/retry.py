"""The one retry policy of tokenrelay's long-lived loops: exponential backoff with a cap, and
which Redis errors are worth waiting out.

Transient errors (Redis down or restarting, a script cache emptied by a restart) are retried as
long as it takes, backing off; anything else Redis answers (out of memory with noeviction, a key
of the wrong type) is permanent and retried only `PERMANENT_TRIES` times, so a caller fails the
work at hand with an error instead of stalling it forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError

from tokenrelay.broker.connection import NETWORK_ERRORS

PERMANENT_TRIES = 5
"""Attempts at a write Redis refuses for a reason of its own before it is given up."""

_TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` goes away by itself: a network error, a Redis still loading or failing
    over, or a script cache a restart emptied."""
    if isinstance(exc, (*NETWORK_ERRORS, NoScriptError, BusyLoadingError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


@dataclass(slots=True)
class Backoff:
    """Delays of 50 ms doubling up to `cap` seconds; `reset` after a success."""

    base: float = 0.05
    cap: float = 2.0
    tries: int = 0

    def next_delay(self) -> float:
        delay: float = min(self.cap, self.base * 2.0 ** min(self.tries, 30))
        self.tries += 1
        return delay

    async def wait(self) -> float:
        """Sleep the next delay; returns it (for the caller's log line)."""
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.tries = 0
