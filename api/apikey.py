"""The API key check (``TOKENRELAY_API_KEYS``), as a plain ASGI middleware.

Not ``BaseHTTPMiddleware``: that one runs the app in a task and copies its response body
through a stream of its own, which turns an aborted response (a time budget, a shutdown, Redis
lost mid-stream) into a clean end, and clients then take a truncated run as finished.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class ApiKeyCheck:
    """Refuse requests without a valid ``x-api-key`` (401), except on `open_paths` and CORS
    preflights; everything else passes through untouched."""

    def __init__(self, app: ASGIApp, *, keys: Iterable[str], open_paths: Iterable[str]) -> None:
        self.app = app
        self._keys = frozenset(keys)
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if headers.get("x-api-key") in self._keys:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        response = JSONResponse(
            {"detail": "Missing or invalid API key (x-api-key header)"}, status_code=401
        )
        await response(scope, receive, send)
