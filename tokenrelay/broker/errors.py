"""Domain errors; the API maps each to an HTTP status in one place (``tokenrelay/api/app.py``)."""

from __future__ import annotations


class TokenrelayError(Exception):
    """Base of every error tokenrelay raises on purpose."""


class NotFound(TokenrelayError):
    """A thread, run or assistant that does not exist."""


class ThreadNotFound(NotFound):
    def __init__(self, thread_id: str) -> None:
        super().__init__(f"Thread with ID {thread_id} not found")


class RunNotFound(NotFound):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"Run with ID {run_id} not found")


class RunExpired(TokenrelayError):
    """A run that existed but whose records passed the retention time."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"Run with ID {run_id} has expired: its events are no longer retained "
            "(TOKENRELAY_RETENTION_SECONDS)"
        )


class RunLost(RunExpired):
    """A run made before this Redis began to hold the data: lost with an earlier Redis
    (restarted without persistence, replaced) or expired."""

    def __init__(self, run_id: str) -> None:
        TokenrelayError.__init__(
            self,
            f"Run with ID {run_id} is no longer stored: it was made before this Redis began to "
            "hold tokenrelay's data (Redis restarted without persistence or was replaced), or "
            "it passed the retention time (TOKENRELAY_RETENTION_SECONDS)",
        )


class NoRunToCancel(NotFound):
    pass


class AssistantNotFound(NotFound):
    def __init__(self, assistant_id: str) -> None:
        super().__init__(f"Assistant with ID {assistant_id} not found")


class InvalidEventId(TokenrelayError):
    """A Last-Event-ID that is not a stream entry id."""

    def __init__(self, value: str) -> None:
        super().__init__(
            f"Invalid Last-Event-ID {value!r}: expected '<ms>-<seq>' as sent in `id:`, or -1/0 "
            "to replay from the start"
        )


class EventIdPastEnd(TokenrelayError):
    """A Last-Event-ID beyond the last event of a finished run: no event will ever follow it."""

    def __init__(self, value: str, run_id: str, last: str | None) -> None:
        where = f"its last event id is {last}" if last else "it sent no event"
        super().__init__(
            f"Last-Event-ID {value} is past the end of run {run_id}, which has finished: "
            f"{where} (or send -1 to replay from the start)"
        )


class InvalidBody(TokenrelayError):
    """A request parameter that passed schema validation but means nothing here."""


class InvalidState(InvalidBody):
    """A state update, checkpoint or history filter the graph or its checkpointer rejected."""

    def __init__(self, what: str, exc: Exception) -> None:
        reason = str(exc).split("\n", 1)[0][:300] or type(exc).__name__
        super().__init__(f"Invalid {what}: {reason}")


class Conflict(TokenrelayError):
    """The request conflicts with current state (for example a thread that already exists)."""


class GraphLoadError(TokenrelayError):
    """A graph spec in TOKENRELAY_GRAPHS that cannot be loaded."""


class Superseded(TokenrelayError):
    """A worker's attempt at a run is no longer the run's current one: another worker took the
    run over (this one was paused or partitioned past its lease), so this one must write nothing
    more."""

    def __init__(self, run_id: str, attempt: int) -> None:
        super().__init__(f"attempt {attempt} of run {run_id} was superseded by a later one")


class AppendFailed(TokenrelayError):
    """Redis refused a run's events for good (out of memory with noeviction, a key of the wrong
    type) after bounded retries; the run is failed instead of retried forever."""
