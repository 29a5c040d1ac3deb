"""The FastAPI application: wiring, lifespan and the one mapping of domain errors to HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tokenrelay.api import openapi
from tokenrelay.api.auth import AuthLayer, load_auth
from tokenrelay.api.deps import Services
from tokenrelay.api.limits import RequestLimits
from tokenrelay.api.routes import aisdk, assistants, ops, protocol, runs, stream, threads
from tokenrelay.api.schemas import WireJSON
from tokenrelay.api.tokens import StreamTokens
from tokenrelay.broker.connection import REFUSING, UNAVAILABLE, connect
from tokenrelay.broker.errors import (
    Conflict,
    EventIdPastEnd,
    InvalidBody,
    InvalidEventId,
    NotFound,
    RunExpired,
    TokenrelayError,
)
from tokenrelay.broker.graphs import GraphRegistry, import_object, open_checkpointer
from tokenrelay.broker.runtime import settle_heap
from tokenrelay.broker.settings import Settings, get_settings

log = logging.getLogger("tokenrelay.api")

EXPOSED_HEADERS = ["Location", "Content-Location"]
OPEN_PATHS = frozenset(
    {"/", "/favicon.ico", "/ok", "/healthz", "/readyz", "/metrics", "/stats", "/docs",
     "/openapi.json", "/info"}
)  # fmt: skip

# The one place domain errors become HTTP statuses (first match wins).
HTTP_STATUS: list[tuple[type[TokenrelayError], int]] = [
    (NotFound, 404),
    (InvalidEventId, 400),
    (EventIdPastEnd, 400),
    (InvalidBody, 422),
    (RunExpired, 410),
    (Conflict, 409),
]


def _abort_streams_on_shutdown(draining: asyncio.Event) -> Callable[[], None]:
    """On SIGTERM/SIGINT, set `draining` (live streams abort, clients resume on another
    replica), then let the server's own handler stop accepting and shut down."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(draining.set)
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (an embedded server): nothing to chain
            previous.pop(sig, None)

    def restore() -> None:
        for sig, prev in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, prev)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (read from the environment when omitted)."""
    cfg = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_checkpointer(cfg.checkpointer) as saver:
            registry = GraphRegistry(cfg.graphs, saver)
            registry.load_all()
            settle_heap()
            redis = connect(cfg.resolved_redis_url(), cluster=cfg.redis_cluster)
            svc = Services.build(cfg, redis, registry)
            await svc.fanout.start()
            app.state.services = svc
            restore = _abort_streams_on_shutdown(svc.draining)
            try:
                yield
            finally:
                restore()
                await svc.fanout.stop()
                await redis.aclose()

    app = FastAPI(
        title="tokenrelay",
        summary="Resumable LangGraph streams over Redis, Agent Server compatible.",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=WireJSON,
    )
    app.add_middleware(RequestLimits, settings=cfg)
    # Custom auth, stream tokens and API keys (api/auth.py); probes, metrics and docs stay open.
    app.state.auth = load_auth(cfg)
    app.add_middleware(
        AuthLayer, auth=app.state.auth, api_keys=cfg.api_keys, open_paths=OPEN_PATHS,
        tokens=StreamTokens.from_settings(cfg), paths=lambda: app.openapi()["paths"],
        # As the Agent Server: http.app's own routes are authenticated only when asked to.
        guard_other_paths=not cfg.http_app or cfg.http_app_auth,
    )  # fmt: skip

    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            # Credentials only with listed origins: a wildcard would let any site send them.
            allow_credentials="*" not in cfg.cors_origins,
        )

    @app.exception_handler(TokenrelayError)
    async def _domain_error(request: Request, exc: TokenrelayError) -> JSONResponse:
        status = next((code for kind, code in HTTP_STATUS if isinstance(exc, kind)), 500)
        if status == 500:
            log.error("unmapped error", exc_info=exc)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        detail = (
            "Redis is unavailable; retry shortly"
            if isinstance(exc, UNAVAILABLE)
            else "Redis refuses writes for now (out of memory, read-only or loading); retry shortly"
        )
        return JSONResponse(
            {"detail": detail},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    for unavailable in (*UNAVAILABLE, *REFUSING):
        app.add_exception_handler(unavailable, _redis_down)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # What was wrong and where, never the input itself (it may be megabytes).
        errors = [
            {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": str(e.get("msg"))[:300]}
            for e in exc.errors()[:20]
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        allowed = openapi.allowed_methods(app, request.url.path) if exc.status_code == 405 else []
        if allowed:  # every method of the path, not those of its first route
            headers["Allow"] = ", ".join(allowed)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback by the server; the client learns nothing internal.
        return JSONResponse({"detail": "Internal server error"}, status_code=500)

    # Routes are matched in order, one by one: the streams (joins, resumes) first, as what a
    # reconnect storm asks for. No path of another router is shadowed (their paths differ in
    # a literal segment), only which route's 405 comes first, and that lists every method.
    app.include_router(stream.router)
    app.include_router(ops.router)
    app.include_router(assistants.router)
    app.include_router(threads.router)
    app.include_router(runs.router)
    app.include_router(aisdk.router)
    app.include_router(protocol.router)
    openapi.install(app)
    if cfg.http_app:  # langgraph.json's http.app: the user's routes, beside (after) the API's
        app.mount("/", import_object(cfg.http_app, "http.app"))
    return app
