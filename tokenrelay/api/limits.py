"""Request limits, as plain ASGI middleware (streaming responses pass through untouched).

Per API process: the request body's size, its JSON strictness and depth, open connections and
open streams (503 past them, the probes still answered), and an optional per-client rate limit
(429). Defaults and rationale: docs/security.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from tokenrelay.broker.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/ok", "/healthz", "/readyz", "/metrics"})
"""Answered whatever the load, so an orchestrator never kills a busy replica for being busy."""

OPEN_CONNECTIONS = "tokenrelay.open_connections"
"""Scope key the server protocol (api/serving.py) sets: the process's open connections."""

STREAM_SUFFIXES = ("/stream", "/stream/events", "/join", "/wait", "/events")
"""Paths whose responses stay open for a run's lifetime (SSE, join, wait, long-poll)."""

OWN_JSON_SUFFIXES = ("/commands", "/stream/events")
"""Agent-protocol paths that parse their body with orjson themselves (the same strict parser)
and answer a bad one in the protocol's own error shape."""

RATE_LIMIT_CLIENTS = 100_000
"""Clients whose rate-limit buckets are remembered; the least recently seen is forgotten."""


def is_stream(scope: Scope) -> bool:
    """A request whose response stays open: SSE, join, wait, long-poll, a WebSocket."""
    if scope["type"] == "websocket":
        return True
    path: str = scope["path"]
    return path.endswith(STREAM_SUFFIXES) or (scope["method"] == "POST" and path == "/ai/chat")


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why `body` is not acceptable JSON (RFC 8259 text: UTF-8, no lone surrogates, no NaN), or
    nested deeper than `max_depth`; None when it is fine. The body itself is never quoted."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"Request body is not valid JSON: {exc}"
    stack: list[tuple[Any, int]] = [(doc, 1)] if isinstance(doc, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return f"Request body nests JSON deeper than {max_depth} levels"
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return None


def _is_json(scope: Scope) -> bool:
    # FastAPI parses a body as JSON when it has no content type or a (+)json one.
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return bool(media == b"application/json" or media.endswith(b"+json"))
    return True


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def answer(
    send: Send,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    websocket: bool = False,
) -> None:
    """A small JSON error response, written straight to ASGI (a WebSocket's denial response
    with `websocket`)."""
    body = orjson.dumps({"detail": detail})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    kind = "websocket.http.response" if websocket else "http.response"
    await send({"type": f"{kind}.start", "status": status, "headers": raw})
    await send({"type": f"{kind}.body", "body": body})


class RateLimiter:
    """Token buckets per client: `per_minute` sustained, `burst` at once."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst or max(1, per_minute // 10))
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> float:
        """Spend one request of `client`: 0 when allowed, else the seconds until one is."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # re-inserted: most recently seen last
        if len(self._buckets) > RATE_LIMIT_CLIENTS:
            del self._buckets[next(iter(self._buckets))]
        return wait


def client_key(scope: Scope, api_keys: frozenset[str]) -> str:
    """Who a request counts against: its API key when it is a configured one (an invented key
    per request would escape the limit), else its client address (uvicorn resolves
    X-Forwarded-For from the proxies `--forwarded-allow-ips` trusts)."""
    key = (_header(scope, b"x-api-key") or b"").decode("latin-1")
    if key in api_keys:
        return "key:" + key
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


class RequestLimits:
    """Rejects what is over a limit before the application sees it."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.open_streams = 0
        self.api_keys = frozenset(settings.api_keys)
        self.connections_cap = settings.connections_cap()
        self.limiter = (
            RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
            if settings.rate_limit_per_minute
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        websocket = scope["type"] == "websocket"
        refusal = self._refusal(scope)
        if refusal is not None:
            status, detail, headers = refusal
            if websocket and "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": 1013, "reason": detail[:120]})
            else:  # an HTTP answer, for a WebSocket too where the server can deny with one
                await answer(send, status, detail, headers, websocket=websocket)
            return
        if not websocket and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            receive = _replay(body, receive)
        if not is_stream(scope):
            await self.app(scope, receive, send)
            return
        self.open_streams += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open_streams -= 1

    def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        cfg = self.settings
        connections = scope.get(OPEN_CONNECTIONS)
        if connections is not None and connections > self.connections_cap:
            return (
                503,
                f"This server has more than {self.connections_cap} open connections "
                "(TOKENRELAY_MAX_OPEN_CONNECTIONS); retry shortly",
                {"Retry-After": "1", "Connection": "close"},
            )
        if self.limiter is not None:
            wait = self.limiter.take(client_key(scope, self.api_keys))
            if wait > 0:
                return (
                    429,
                    f"Rate limit of {cfg.rate_limit_per_minute} requests per minute exceeded "
                    "(TOKENRELAY_RATE_LIMIT_PER_MINUTE)",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        if is_stream(scope) and self.open_streams >= cfg.max_open_streams:
            return (
                503,
                f"This server has {cfg.max_open_streams} open streams "
                "(TOKENRELAY_MAX_OPEN_STREAMS); retry shortly",
                {"Retry-After": "1"},
            )
        return None

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once answered (too large, not JSON, client gone)."""
        limit = self.settings.max_body_bytes
        too_large = f"Request body exceeds {limit} bytes (TOKENRELAY_MAX_BODY_BYTES)"
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await answer(send, 413, too_large)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await answer(send, 413, too_large)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(scope) and not scope["path"].endswith(OWN_JSON_SUFFIXES):
            problem = json_problem(body, self.settings.max_json_depth)
            if problem is not None:
                await answer(send, 422, problem)
                return None
        return body


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands out the already-read body once, then the client's own messages
    (its disconnect, which streaming responses wait for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
