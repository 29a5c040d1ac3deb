"""Plain data types shared by the API and the worker."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from broker.errors import InvalidEventId

END_EVENT = "end"
"""Internal terminal marker in every finished stream; each wire protocol renders it its own way."""


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        return self not in (RunStatus.PENDING, RunStatus.RUNNING)


@dataclass(frozen=True, slots=True, order=True)
class StreamId:
    """A Redis stream entry id, ``<ms>-<seq>``; ordered the way Redis orders them."""

    ms: int
    seq: int

    _PATTERN = re.compile(r"^(\d{1,20})-(\d{1,20})$")

    @classmethod
    def parse(cls, value: str | bytes) -> StreamId:
        text = value.decode() if isinstance(value, bytes) else value
        m = cls._PATTERN.match(text)
        if m is None:
            raise InvalidEventId(text)
        ms, seq = int(m.group(1)), int(m.group(2))
        if ms >= 2**64 or seq >= 2**64:
            raise InvalidEventId(text)
        return cls(ms, seq)

    @classmethod
    def parse_last_event_id(cls, value: str) -> StreamId:
        """Parse a client's Last-Event-ID: ``-1`` and ``0`` mean "from the start"."""
        text = value.strip()
        if text in ("-1", "0", "0-0"):
            return ZERO_ID
        return cls.parse(text)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO_ID = StreamId(0, 0)


@dataclass(frozen=True, slots=True)
class Event:
    """An event before it is stored: wire name and JSON payload bytes.

    ``blob`` holds the part of a ``messages`` tuple that repeats from token to token; it is
    stored once per run and spliced back when the event is sent: as ``[<data>,<blob>]``, or,
    with ``content_only``, as ``[{"content":<data>,<blob>]`` where `data` is just the chunk's
    content and `blob` the rest of the chunk followed by its metadata.
    """

    name: str
    data: bytes
    blob: bytes | None = None
    content_only: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    """An event as stored in a run's stream. ``blob_ref`` names a blob in the run's blob hash."""

    id: StreamId
    name: str
    data: bytes
    blob_ref: bytes | None = None

    @property
    def is_end(self) -> bool:
        return self.name == END_EVENT


@dataclass(slots=True)
class Job:
    """A queued run, as the worker receives it."""

    run_id: str
    thread_id: str
    assistant_id: str


@dataclass(frozen=True, slots=True)
class Gap:
    """Events after `after` were trimmed from the stream; delivery resumes at `resumes_at`."""

    after: StreamId
    resumes_at: StreamId
