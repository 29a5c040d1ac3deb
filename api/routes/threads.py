"""Threads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from api.deps import Services, services
from api.schemas import ThreadCreate, thread_json

router = APIRouter(tags=["threads"])


async def thread_status(svc: Services, thread_id: str) -> str:
    if await svc.runs.active_run(thread_id):
        return "busy"
    return await svc.threads.last_status(thread_id)


@router.post("/threads")
async def create_thread(body: ThreadCreate, svc: Services = Depends(services)) -> dict[str, Any]:
    thread = await svc.threads.create(body.thread_id, body.metadata, if_exists=body.if_exists)
    return thread_json(thread, await thread_status(svc, thread.thread_id))


@router.get("/threads/{thread_id}")
async def get_thread(thread_id: str, svc: Services = Depends(services)) -> dict[str, Any]:
    thread = await svc.threads.get(thread_id)
    return thread_json(thread, await thread_status(svc, thread_id))
