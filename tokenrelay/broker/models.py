"""Plain data types shared by the API and the worker."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from tokenrelay.broker.errors import InvalidEventId

END_EVENT = "end"
"""Internal terminal marker in every finished stream; each wire protocol renders it its own way."""

PROTOCOL_ONLY = "~"
"""Names of events only the agent streaming protocol renders start with this (``~l`` lifecycle,
``~m`` messages, ``~t`` tools, ``~i`` input requests); the classic protocols skip them."""
LIFECYCLE_EVENT = "~l"
MESSAGES_EVENT = "~m"
TOOLS_EVENT = "~t"
INPUT_EVENT = "~i"


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


_ID_PATTERN = re.compile(r"^(\d{1,20})-(\d{1,20})$")


class StreamId(NamedTuple):
    """A Redis stream entry id, ``<a>-<b>``; ordered the way Redis orders them.

    Run events get ``<thread seq>-<ms>`` (see scripts/append.lua): `ms` then holds the event's
    seq in its thread and `seq` its time. Other streams use Redis' own ``<ms>-<n>``.

    A tuple, not a frozen dataclass: an API process builds one per live event per run and
    compares them at every step of a tail, where a tuple is made and compared in a third of
    the time.
    """

    ms: int
    seq: int

    @classmethod
    def parse(cls, value: str | bytes) -> StreamId:
        text = value.decode() if isinstance(value, bytes) else value
        m = _ID_PATTERN.match(text)
        if m is None:
            raise InvalidEventId(text)
        ms, seq = int(m.group(1)), int(m.group(2))
        if ms >= 2**64 or seq >= 2**64:
            raise InvalidEventId(text)
        return cls(ms, seq)

    @classmethod
    def of_redis(cls, raw: bytes) -> StreamId:
        """An id Redis returned: well formed, so not checked as `parse` checks a client's."""
        ms, _, seq = raw.partition(b"-")
        return _new_tuple(cls, (int(ms), int(seq)))

    @classmethod
    def parse_last_event_id(cls, value: str) -> StreamId:
        """Parse a client's Last-Event-ID: ``-1`` and ``0`` mean "from the start"."""
        text = value.strip()
        if text in ("-1", "0", "0-0"):
            return ZERO_ID
        return cls.parse(text)

    @classmethod
    def after_thread_seq(cls, seq: int) -> StreamId:
        """The position just past every entry of thread seq `seq` (a resume cursor)."""
        return cls(seq, 2**64 - 1)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


_new_tuple = tuple.__new__
ZERO_ID = StreamId(0, 0)
LAST_ID = StreamId(2**64 - 1, 2**64 - 1)
"""Past every entry of any stream."""


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


@dataclass(slots=True)
class Entry:
    """An event as stored in a run's stream. ``blob_ref`` names a blob in the run's blob hash.

    Never changed once made (it is shared by every reader of a live batch), but not frozen:
    an API process makes two per live event per run, and a frozen one takes four times as
    long to make."""

    id: StreamId
    name: str
    data: bytes
    blob_ref: bytes | None = None
    node: bytes | None = None
    """The graph node of a protocol `messages` event, once its blob is resolved."""

    @property
    def is_end(self) -> bool:
        return self.name == END_EVENT

    @property
    def classic(self) -> bool:
        """Whether the classic protocols send this entry (not `end`, not protocol-only)."""
        return not self.name.startswith(PROTOCOL_ONLY) and self.name != END_EVENT


@dataclass(slots=True)
class Job:
    """A queued run, as the worker receives it."""

    run_id: str
    thread_id: str
    assistant_id: str
    not_before: int = 0
    """When the run may start (ms since the epoch; a client's `after_seconds`), 0 at once."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Events after `after` were trimmed from the stream; delivery resumes at `resumes_at`."""

    after: StreamId
    resumes_at: StreamId
