"""Liveness, readiness and server info."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from tokenrelay.api.deps import Services, services
from tokenrelay.broker.connection import REFUSING, ready

log = logging.getLogger("tokenrelay.api")

router = APIRouter(tags=["ops"])

STATIC = Path(__file__).resolve().parent.parent / "static"
CONSOLE = STATIC / "console.html"
ICON = STATIC / "icon.svg"


@router.get("/", include_in_schema=False)
async def console() -> HTMLResponse:
    """The console: threads, a live stream with drop-and-resume, stop and branch, metrics."""
    return HTMLResponse(CONSOLE.read_text())


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    """The console's icon (an SVG: browsers take it under this name too)."""
    return Response(
        ICON.read_bytes(),
        media_type="image/svg+xml",
        headers={"Cache-Control": "public, max-age=86400"},
    )


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


def _sample(name: str) -> int:
    return int(REGISTRY.get_sample_value(name) or 0)


@router.get("/stats")
async def stats(svc: Services = Depends(services)) -> dict[str, int]:
    """A few live figures as JSON, for a dashboard (the console's chart) that would rather
    not parse Prometheus text. Runs are counted across the deployment (from the run queue);
    streams and events are this API process's own, named by `pid` so a poller that lands on
    another replica can tell its counters apart."""
    load = await svc.queue.load()
    return {
        "runs_running": load.running,
        "runs_waiting": load.waiting,
        "streams_open": _sample("tokenrelay_api_streams_open"),
        "events_sent": _sample("tokenrelay_api_events_sent_total"),
        "pid": os.getpid(),
    }


@router.get("/info")
async def info() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "flags": {"assistants": True, "crons": False, "langsmith": False},
        "metadata": {"server": "tokenrelay"},
    }
