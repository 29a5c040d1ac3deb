"""A wait that swallows its first cancellations, as a library call inside a task can (Python
3.11's `asyncio.wait_for`, in redis-py, returns instead of raising when the cancellation lands
as what it waits for completes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Stubborn:
    def __init__(self, swallows: int, on_swallow: Callable[[], None] | None = None) -> None:
        self.swallows = swallows
        self.swallowed = 0
        self._on_swallow = on_swallow

    async def wait(self) -> None:
        """Wait for ever; the first `swallows` cancellations are taken and the wait goes on."""
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.swallowed >= self.swallows:
                    raise
                self.swallowed += 1
                if self._on_swallow is not None:
                    self._on_swallow()
