"""HTTP bodies (pydantic, at the edge only) and the JSON shapes of threads and runs."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.responses import Response

from tokenrelay.broker import codec
from tokenrelay.broker.errors import InvalidBody
from tokenrelay.broker.runs import RunRecord
from tokenrelay.broker.threads import ThreadRecord

StreamModeName = Literal[
    "values", "updates", "messages-tuple", "messages", "custom", "debug", "tasks", "checkpoints",
    "events",
]  # fmt: skip


class WireJSON(Response):
    """JSON encoded by the one wire encoder, which knows LangChain messages and state types."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return codec.json_bytes(content)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


ID_MAX_LENGTH = 128
ID_RULE = (
    f"1 to {ID_MAX_LENGTH} characters, none of them a control character (such as a newline or "
    "NUL), '{', '}', ':' or '/', and not '.' or '..'"
)
"""The one rule for a thread, run or chat id a client chooses. Ids are part of key names and
hash tags (broker/keys.py): a brace would move a thread's keys to another slot of a Redis
Cluster. They are path segments too: a slash, '.' or '..' would make the resume URL
(`Location`) point elsewhere, and a newline cannot be sent in a header at all."""

_ID_FORBIDDEN = frozenset("{}:/")
_CONTROL = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, lone surrogates, line breaks


def id_problem(value: str, name: str = "thread_id") -> str | None:
    """Why `value` cannot be a thread, run or chat id, or None when it can."""
    if (
        not 0 < len(value) <= ID_MAX_LENGTH
        or value in (".", "..")
        or any(c in _ID_FORBIDDEN or unicodedata.category(c) in _CONTROL for c in value)
    ):
        return f"{name} must be {ID_RULE}"
    return None


def check_id(value: str, name: str = "thread_id") -> str:
    """`value` when it is a valid id; InvalidBody (422) naming the rule otherwise."""
    problem = id_problem(value, name)
    if problem is not None:
        raise InvalidBody(problem)
    return value


def _valid_id(value: str | None) -> str | None:
    if value is not None and (problem := id_problem(value, "id")) is not None:
        raise ValueError(problem)
    return value


ClientId = Annotated[
    str,
    AfterValidator(_valid_id),
    Field(
        description=f"A client-chosen id: {ID_RULE}.",
        json_schema_extra={
            "minLength": 1,
            "maxLength": ID_MAX_LENGTH,
            "pattern": "^(?!\\.\\.?$)[^{}:/\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]+$",
        },
    ),
]
"""A thread or chat id in a request body, checked by the one id rule."""


def id_in_path(value: str) -> str:
    """`value` percent-encoded for a `Location` header (ids may hold spaces or non-ASCII)."""
    # Most ids (UUIDs) are what `quote` leaves as is: checked first, a tenth of its cost.
    return value if _UNRESERVED.fullmatch(value) else quote(value, safe="")


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
"""What `quote(value, safe="")` never encodes."""


class ThreadCreate(BaseModel):
    model_config = ConfigDict(extra="allow")

    thread_id: ClientId | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    if_exists: Literal["raise", "do_nothing"] = "raise"


class RunCreate(BaseModel):
    """The body of ``POST /threads/{tid}/runs[/stream|/wait]``, as the Agent Server takes it."""

    model_config = ConfigDict(extra="allow")

    assistant_id: str = Field(min_length=1)
    input: dict[str, Any] | list[Any] | str | int | float | bool | None = None
    command: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    stream_mode: StreamModeName | list[StreamModeName] = "values"
    stream_subgraphs: bool = False
    stream_resumable: bool = False
    on_disconnect: Literal["continue", "cancel"] = "continue"
    multitask_strategy: Literal["reject", "interrupt", "rollback", "enqueue"] = "enqueue"
    checkpoint_id: str | None = None
    checkpoint: dict[str, Any] | None = None
    if_not_exists: Literal["create", "reject"] = "reject"
    after_seconds: float | None = Field(
        default=None,
        ge=0,
        le=366 * 86400,
        allow_inf_nan=False,
        description="Start the run this many seconds from now; it is `pending` until then, and "
        "holds its thread as an active run does.",
    )
    on_completion: Literal["delete", "keep"] = Field(
        default="delete",
        description="A stateless run's thread (`POST /runs/...`) after the run ends: deleted "
        "(the default) or kept, to be read and run on like any other thread.",
    )
    interrupt_before: Literal["*"] | list[str] | None = None
    interrupt_after: Literal["*"] | list[str] | None = None
    durability: Literal["sync", "async", "exit"] | None = Field(
        default=None,
        description="When the graph persists its checkpoints, as LangGraph's `durability`: "
        "`async` (the default) while the next step runs, `sync` before it, `exit` only when "
        "the run ends (a cancelled run still keeps its partial output).",
    )
    checkpoint_during: bool | None = Field(
        default=None,
        description="Deprecated: `true` is `durability: async`, `false` is `durability: exit`.",
    )
    stream_protocol: Literal["classic", "agent"] = Field(
        default="classic",
        description="How the worker streams the run: `agent` for the agent streaming protocol "
        "(set by `POST /threads/{tid}/commands` run.start).",
    )

    @field_validator("stream_mode", mode="before")
    @classmethod
    def _json_array(cls, v: Any) -> Any:
        # A JSON array sent as a string, as some clients and proxies do.
        if isinstance(v, str) and v.strip().startswith("["):
            try:
                return orjson.loads(v)
            except orjson.JSONDecodeError:
                return v
        return v

    def with_stream_modes(self, modes: list[str]) -> RunCreate:
        """A copy with `modes` (validated) in place of the body's stream modes."""
        try:
            return RunCreate.model_validate({**self.model_dump(), "stream_mode": modes})
        except ValidationError as exc:
            raise InvalidBody(f"stream_mode {modes!r}: {exc.errors()[0]['msg']}") from None

    @model_validator(mode="after")
    def _one_durability(self) -> RunCreate:
        if self.durability is not None and self.checkpoint_during is not None:
            raise ValueError("give `durability` or the deprecated `checkpoint_during`, not both")
        return self

    def graph_durability(self) -> str | None:
        """The run's `durability`, the deprecated `checkpoint_during` mapped as LangGraph maps
        it; None leaves the graph's default (`async`)."""
        if self.checkpoint_during is not None:
            return "async" if self.checkpoint_during else "exit"
        return self.durability

    def stream_modes(self) -> list[str]:
        modes = [self.stream_mode] if isinstance(self.stream_mode, str) else self.stream_mode
        return list(dict.fromkeys(modes)) or ["values"]

    def run_kwargs(self) -> dict[str, Any]:
        checkpoint_id = self.checkpoint_id or (self.checkpoint or {}).get("checkpoint_id")
        return {
            "input": self.input,
            "command": self.command,
            "config": self.config or {},
            "context": self.context or {},
            "stream_mode": self.stream_modes(),
            "subgraphs": self.stream_subgraphs,
            "resumable": self.stream_resumable,
            "checkpoint_id": checkpoint_id,
            "interrupt_before": self.interrupt_before,
            "interrupt_after": self.interrupt_after,
            "durability": self.graph_durability(),
            "stream_protocol": self.stream_protocol,
            **({"after_seconds": self.after_seconds} if self.after_seconds else {}),
        }


def thread_json(thread: ThreadRecord, status: str, values: Any = None) -> dict[str, Any]:
    return {
        "thread_id": thread.thread_id,
        "created_at": iso(thread.created_at),
        "updated_at": iso(thread.updated_at),
        "state_updated_at": iso(thread.updated_at),
        "metadata": thread.metadata,
        "status": status,
        "config": {},
        "values": values,
        "interrupts": {},
        "error": None,
    }


def run_json(run: RunRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_id": run.run_id,
        "thread_id": run.thread_id,
        "assistant_id": run.assistant_id,
        "created_at": iso(run.created_at),
        "updated_at": iso(run.updated_at),
        "status": run.status.value,
        "metadata": run.metadata,
        "kwargs": {**run.kwargs, "on_disconnect": run.on_disconnect},
        "multitask_strategy": run.multitask_strategy,
        "attempt": run.attempt,
    }
    if run.error:
        out["error"] = run.error
    if run.checkpoint_id:
        out["checkpoint_id"] = run.checkpoint_id
    return out
