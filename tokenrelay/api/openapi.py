"""The OpenAPI document: the real response shapes and every status code each operation answers.

Routes return pre-encoded JSON (WireJSON, the one wire encoder) rather than pydantic models, so
the shapes are declared here, once, and attached to each operation when the document is built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import compile_path

# -- response shapes (documentation: the routes build these dicts themselves) ------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Error(_Open):
    """Every error answer: a message, or for a malformed body, where each problem is."""

    detail: str | list[dict[str, Any]]


class Checkpoint(_Open):
    thread_id: str | None = None
    checkpoint_ns: str = ""
    checkpoint_id: str | None = None


class Thread(_Open):
    thread_id: str
    created_at: str
    updated_at: str
    state_updated_at: str
    metadata: dict[str, Any]
    status: str
    config: dict[str, Any]
    values: Any = None
    interrupts: dict[str, Any]
    error: Any = None


class Run(_Open):
    run_id: str
    thread_id: str
    assistant_id: str
    created_at: str
    updated_at: str
    status: str
    metadata: dict[str, Any]
    kwargs: dict[str, Any]
    multitask_strategy: str
    attempt: int


class ThreadState(_Open):
    values: Any = None
    next: list[str]
    tasks: list[dict[str, Any]]
    metadata: dict[str, Any] | None = None
    created_at: str | None = None
    checkpoint: Checkpoint | None = None
    parent_checkpoint: Checkpoint | None = None
    interrupts: list[dict[str, Any]]
    checkpoint_id: str | None = None
    parent_checkpoint_id: str | None = None


class StateUpdated(_Open):
    checkpoint: Checkpoint | None = None
    configurable: dict[str, Any]
    checkpoint_id: str | None = None


class Assistant(_Open):
    assistant_id: str
    graph_id: str
    name: str
    config: dict[str, Any]
    metadata: dict[str, Any]


class PolledEvents(_Open):
    events: list[dict[str, Any]]
    next: str
    done: bool


class Ready(_Open):
    status: str
    detail: str | None = None


class Stats(BaseModel):
    """Live figures: runs across the deployment, streams and events of the answering process."""

    runs_running: int = Field(description="Runs a worker is executing (claimed from the queue).")
    runs_waiting: int = Field(description="Runs queued for a worker, not yet claimed.")
    streams_open: int = Field(description="SSE responses this API process is serving.")
    events_sent: int = Field(
        description="Events this API process has written to clients since it started "
        "(a counter: the rate is its difference over time, per `pid`)."
    )
    pid: int = Field(description="The answering API process.")


MODELS: list[type[BaseModel]] = [
    Error, Checkpoint, Thread, Run, ThreadState, StateUpdated, Assistant, PolledEvents, Ready,
    Stats,
]  # fmt: skip

# -- what each operation answers ----------------------------------------------------------------

SSE = "sse"
EMPTY = "empty"
ANY = "any"
Body = type[BaseModel] | tuple[str, type[BaseModel]] | str
"""A model, ("array", model), SSE, EMPTY (no body), or ANY (JSON of any shape)."""

SUCCESS: dict[tuple[str, str], dict[int, Body]] = {
    ("GET", "/ok"): {200: ANY},
    ("GET", "/healthz"): {200: ANY},
    ("GET", "/readyz"): {200: Ready, 503: Ready},
    ("GET", "/info"): {200: ANY},
    ("GET", "/stats"): {200: Stats},
    ("POST", "/assistants/search"): {200: ("array", Assistant)},
    ("POST", "/assistants/count"): {200: ANY},
    ("GET", "/assistants/{assistant_id}"): {200: Assistant},
    ("GET", "/assistants/{assistant_id}/graph"): {200: ANY},
    ("GET", "/assistants/{assistant_id}/schemas"): {200: ANY},
    ("GET", "/assistants/{assistant_id}/subgraphs"): {200: ANY},
    ("POST", "/threads"): {200: Thread},
    ("POST", "/threads/search"): {200: ("array", Thread)},
    ("POST", "/threads/count"): {200: ANY},
    ("GET", "/threads/{thread_id}"): {200: Thread},
    ("PATCH", "/threads/{thread_id}"): {200: Thread, 204: EMPTY},
    ("DELETE", "/threads/{thread_id}"): {204: EMPTY},
    ("POST", "/threads/{thread_id}/copy"): {200: Thread},
    ("GET", "/threads/{thread_id}/state"): {200: ThreadState},
    ("GET", "/threads/{thread_id}/state/{checkpoint_id}"): {200: ThreadState},
    ("POST", "/threads/{thread_id}/state/checkpoint"): {200: ThreadState},
    ("POST", "/threads/{thread_id}/state"): {200: StateUpdated},
    ("POST", "/threads/{thread_id}/history"): {200: ("array", ThreadState)},
    ("GET", "/threads/{thread_id}/history"): {200: ("array", ThreadState)},
    ("POST", "/threads/{thread_id}/runs"): {200: Run},
    ("POST", "/runs"): {200: Run},
    ("POST", "/runs/batch"): {200: ("array", Run)},
    ("POST", "/threads/{thread_id}/runs/wait"): {200: ANY},
    ("POST", "/runs/wait"): {200: ANY},
    ("GET", "/threads/{thread_id}/runs"): {200: ("array", Run)},
    ("GET", "/threads/{thread_id}/runs/{run_id}"): {200: Run},
    ("GET", "/threads/{thread_id}/runs/{run_id}/join"): {200: ANY},
    ("POST", "/threads/{thread_id}/runs/{run_id}/cancel"): {200: Run, 202: Run, 204: EMPTY},
    ("POST", "/runs/cancel"): {204: EMPTY},
    ("DELETE", "/threads/{thread_id}/runs/{run_id}"): {204: EMPTY},
    ("POST", "/threads/{thread_id}/runs/stream"): {200: SSE},
    ("POST", "/runs/stream"): {200: SSE},
    ("GET", "/threads/{thread_id}/stream"): {200: SSE, 204: EMPTY},
    ("GET", "/threads/{thread_id}/runs/{run_id}/stream"): {200: SSE},
    ("GET", "/threads/{thread_id}/runs/{run_id}/events"): {200: PolledEvents},
    ("POST", "/ai/chat"): {200: SSE},
    ("GET", "/ai/chat/{chat_id}/stream"): {200: SSE, 204: EMPTY},
    ("POST", "/ai/chat/{chat_id}/stop"): {200: ANY},
    # The agent protocol answers in its own envelope (success or error), errors included.
    ("POST", "/threads/{thread_id}/commands"): {200: ANY, 400: ANY, 404: ANY, 409: ANY},
    ("POST", "/threads/{thread_id}/stream/events"): {200: SSE, 400: ANY, 404: ANY},
}

ERRORS: dict[int, str] = {
    400: "A malformed Last-Event-ID or parameter.",
    401: "Missing or invalid API key (when TOKENRELAY_API_KEYS is set).",
    404: "No such thread, run or assistant.",
    409: "Conflicts with the thread's state (an active run, an existing id).",
    410: "The run's events are no longer retained.",
    413: "The request body exceeds TOKENRELAY_MAX_BODY_BYTES.",
    422: "The body or a parameter is invalid (its JSON, its depth, an id, a value).",
    429: "Over the per-client rate limit; see Retry-After.",
    503: "Redis is unavailable or refusing writes, or this process is at its connection or "
    "stream limit; see Retry-After.",
}
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "JSON, or `[DONE]` ending an AI SDK stream"},
        "id": {"type": "string", "description": "the Redis stream entry id, for Last-Event-ID"},
        "retry": {"type": "integer"},
    },
}
"""One server-sent event."""

PROBES = {"/ok", "/healthz", "/readyz"}
"""Answered whatever the load and without credentials: no error codes to declare."""


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _response(body: Body, description: str) -> dict[str, Any]:
    if body == EMPTY:
        return {"description": description}
    if body == SSE:
        return {
            "description": "Server-sent events (`event:`, `data:`, `id:` lines; resume with "
            "Last-Event-ID).",
            # Before OpenAPI 3.2, an event stream's schema describes one event.
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    if body == ANY:
        schema: dict[str, Any] = {}
    elif isinstance(body, tuple):
        schema = {"type": "array", "items": _ref(body[1])}
    else:
        assert isinstance(body, type)
        schema = _ref(body)
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build(app: FastAPI) -> dict[str, Any]:
    """The document for `app`, with the response shapes and status codes declared here."""
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for path, item in doc["paths"].items():
        for method, op in item.items():
            success = SUCCESS.get((method.upper(), path), {200: ANY})
            responses = {
                str(status): _response(body, "Success" if status < 300 else "Error")
                for status, body in success.items()
            }
            if path not in PROBES:
                for status, description in ERRORS.items():
                    responses.setdefault(str(status), _response(Error, description))
            op["responses"] = responses
    return doc


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the document declares for `path`, sorted. The most
    literal templates win, as in routing: `/threads/search` is its own resource, not also a
    `/threads/{thread_id}`."""
    paths = app.openapi()["paths"]
    matching = [t for t in paths if compile_path(t)[0].match(path)]
    fewest = min((t.count("{") for t in matching), default=0)
    methods: set[str] = set()
    for template in matching:
        if template.count("{") == fewest:
            methods |= {m.upper() for m in paths[template]}
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Serve `build(app)` as the app's /openapi.json (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
