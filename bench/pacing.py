"""The token stream every benchmarked system produces: same payload, same pacing.

Each token is ``ts<time.monotonic_ns(), 19 digits> du<19 digits> n<index> `` followed by `pad`
filler characters: stamped when it is produced (``ts``), with the time it was due by the schedule
(``du``) and its index in the stream (``n``). The first `burst` tokens come back to back, the rest
every `interval_ms` (0: unpaced, every token due at the start), on absolute times so timers do not
drift. `start_in_ms` delays the first token, so fan-out readers can connect before the run
produces. Latency from ``ts`` is what the relay adds once a token exists; latency from ``du`` also
counts a producer that fell behind its schedule (a loaded worker), which a user sees just the same.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

TS = re.compile(rb"ts(\d{19})")
"""Finds the production timestamps in any system's wire bytes."""
TOKEN = re.compile(rb"ts(\d{19}) du(\d{19}) n(\d+)")
"""A token's production time, due time and index."""


@dataclass(frozen=True)
class Pace:
    tokens: int = 100
    interval_ms: float = 50.0
    burst: int = 0
    pad: int = 16
    start_in_ms: float = 0.0

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Pace:
        fields = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name in fields:
                kwargs[name] = int(value) if fields[name].type == "int" else float(value)
        return cls(**kwargs)

    def params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    def token(self, index: int, due: float | None = None) -> str:
        """Token `index`, due at monotonic time `due` (seconds; None: now)."""
        # CLOCK_MONOTONIC: one clock for every process on the machine, Node's hrtime included.
        now = time.monotonic_ns()
        due_ns = now if due is None else int(due * 1e9)
        return f"ts{now:019d} du{due_ns:019d} n{index} " + "x" * self.pad

    def schedule(self, t0: float) -> Iterator[float]:
        """Monotonic due time of each token, starting from `t0`."""
        start = t0 + self.start_in_ms / 1000
        step = self.interval_ms / 1000
        for i in range(self.tokens):
            yield start if i < self.burst else start + (i - self.burst + 1) * step

    @property
    def seconds(self) -> float:
        return self.start_in_ms / 1000 + max(0, self.tokens - self.burst) * self.interval_ms / 1000
