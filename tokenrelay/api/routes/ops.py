"""Liveness, readiness and server info."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenrelay.api.deps import Services, services
from tokenrelay.broker.connection import REFUSING, ready

log = logging.getLogger("tokenrelay.api")

router = APIRouter(tags=["ops"])

CONSOLE = Path(__file__).resolve().parent.parent / "static" / "console.html"


@router.get("/", include_in_schema=False)
async def console() -> HTMLResponse:
    """A console for the demo graph: stream, refresh to resume, stop."""
    return HTMLResponse(CONSOLE.read_text())


@router.get("/ok")
async def ok() -> dict[str, bool]:
    return {"ok": True}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(svc: Services = Depends(services)) -> dict[str, str] | JSONResponse:
    """Redis answers (every node of a cluster, with all its slots served) and takes writes.
    Says what is down, never where or why: the answer is open to unauthenticated callers."""
    try:
        await ready(svc.redis, svc.keys.probe())
    except Exception as exc:  # any failure means not ready
        log.warning("not ready: redis: %s", exc)
        detail = "redis is unreachable or not serving"
        if isinstance(exc, REFUSING):
            detail = "redis refuses writes (at maxmemory, read-only or loading)"
        return JSONResponse(
            {"status": "unavailable", "detail": detail},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/info")
async def info() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "flags": {"assistants": True, "crons": False, "langsmith": False},
        "metadata": {"server": "tokenrelay"},
    }
