"""Threads, their state and history."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Caller, Filter, caller, matches
from api.deps import Services, services
from api.schemas import ThreadCreate, WireJSON, thread_json
from broker.errors import Conflict
from broker.threads import ThreadRecord

router = APIRouter(tags=["threads"])


class ThreadPatch(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, Any] = Field(default_factory=dict)


class ThreadSearch(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, Any] | None = None
    values: dict[str, Any] | None = None
    ids: list[str] | None = None
    status: Literal["idle", "busy", "interrupted", "error"] | None = None
    limit: int = Field(default=10, ge=0, le=1000)
    offset: int = Field(default=0, ge=0)
    sort_by: Literal["thread_id", "status", "created_at", "updated_at", "state_updated_at"] = (
        "updated_at"
    )
    sort_order: Literal["asc", "desc"] = "desc"


class StateUpdate(BaseModel):
    model_config = ConfigDict(extra="allow")
    values: dict[str, Any] | list[Any] | None = None
    as_node: str | None = None
    checkpoint: dict[str, Any] | None = None
    checkpoint_id: str | None = None


class StateAt(BaseModel):
    model_config = ConfigDict(extra="allow")
    checkpoint: dict[str, Any]
    subgraphs: bool = False


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="allow")
    limit: int = Field(default=10, ge=1, le=1000)
    before: str | dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None


def graph_of(thread: ThreadRecord) -> str | None:
    gid = thread.metadata.get("graph_id")
    return gid if isinstance(gid, str) else None


async def thread_view(svc: Services, thread: ThreadRecord) -> dict[str, Any]:
    """The Thread object: status from the active run, the last run and pending interrupts."""
    state = await svc.states.get(graph_of(thread), thread.thread_id)
    values = state["values"] if state["checkpoint"] else None
    if await svc.runs.active_run(thread.thread_id):
        status = "busy"
    else:
        status = await svc.threads.last_status(thread.thread_id)
        if status == "idle" and state["next"]:
            status = "interrupted"
    out = thread_json(thread, status, values)
    out["interrupts"] = {t["id"]: t["interrupts"] for t in state["tasks"] if t["interrupts"]}
    return out


@router.post("/threads", response_model=None)
async def create_thread(
    body: ThreadCreate, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> WireJSON:
    metadata = await who.new_thread_metadata(body.thread_id, body.metadata, body.if_exists)
    if (
        body.thread_id is not None
        and body.if_exists == "do_nothing"
        and await svc.threads.exists(body.thread_id)
    ):
        return WireJSON(await thread_view(svc, await who.thread(body.thread_id)))
    thread = await svc.threads.create(body.thread_id, metadata, if_exists=body.if_exists)
    return WireJSON(await thread_view(svc, thread))


@router.get("/threads/{thread_id}", response_model=None)
async def get_thread(
    thread_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    return await thread_view(svc, await who.thread(thread_id))


@router.patch("/threads/{thread_id}", response_model=None)
async def patch_thread(
    thread_id: str,
    body: ThreadPatch,
    prefer: str | None = Header(default=None),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any] | Response:
    value: dict[str, Any] = {"metadata": dict(body.metadata)}
    await who.thread(thread_id, "update", **value)
    thread = await svc.threads.update_metadata(thread_id, value["metadata"])
    if prefer and "return=minimal" in prefer:
        return Response(status_code=204)
    return await thread_view(svc, thread)


@router.delete("/threads/{thread_id}", status_code=204)
async def delete_thread(
    thread_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> Response:
    await who.thread(thread_id, "delete")
    if await svc.runs.active_run(thread_id):
        raise Conflict(f"Thread {thread_id} has an active run; cancel it first")
    await svc.threads.delete(thread_id)
    await svc.states.delete(thread_id)
    return Response(status_code=204)


@router.post("/threads/search", response_model=None)
async def search_threads(
    body: ThreadSearch, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> WireJSON:
    found = await _search(svc, body, await _search_filter(who, body))
    page = found[body.offset : body.offset + body.limit]
    headers = {"X-Pagination-Total": str(len(found))}
    if body.offset + body.limit < len(found):
        headers["X-Pagination-Next"] = str(body.offset + body.limit)
    return WireJSON(page, headers=headers)


async def _search_filter(who: Caller, body: ThreadSearch) -> Filter | None:
    value = body.model_dump(include={"metadata", "values", "status", "limit", "offset", "ids"})
    value["metadata"] = value["metadata"] or {}
    return await who.allow("threads", "search", value)


async def _search(
    svc: Services, body: ThreadSearch, scope: Filter | None = None
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    ids = body.ids or await svc.threads.list_ids()
    for tid in ids:
        try:
            thread = await svc.threads.get(tid)
        except Exception:  # deleted while we looked
            continue
        if body.metadata and any(thread.metadata.get(k) != v for k, v in body.metadata.items()):
            continue
        if scope and not matches(thread.metadata, scope):
            continue
        view = await thread_view(svc, thread)
        if body.status and view["status"] != body.status:
            continue
        if body.values and any((view["values"] or {}).get(k) != v for k, v in body.values.items()):
            continue
        found.append(view)
    found.sort(key=lambda t: t.get(body.sort_by) or "", reverse=body.sort_order == "desc")
    return found


@router.post("/threads/count", response_model=None)
async def count_threads(
    body: ThreadSearch, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> int:
    body = body.model_copy(update={"limit": 1_000_000, "offset": 0})
    return len(await _search(svc, body, await _search_filter(who, body)))


@router.post("/threads/{thread_id}/copy", response_model=None)
async def copy_thread(
    thread_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    """A new thread with this one's metadata and checkpoints."""
    source = await who.thread(thread_id)
    copy = await svc.threads.create(None, await who.new_thread_metadata(None, source.metadata))
    await svc.states.copy(thread_id, copy.thread_id)
    return await thread_view(svc, copy)


@router.get("/threads/{thread_id}/state", response_model=None)
async def get_state(
    thread_id: str,
    subgraphs: bool = Query(default=False),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    thread = await who.thread(thread_id)
    return await svc.states.get(graph_of(thread), thread_id, subgraphs=subgraphs)


@router.get("/threads/{thread_id}/state/{checkpoint_id}", response_model=None)
async def get_state_at(
    thread_id: str,
    checkpoint_id: str,
    subgraphs: bool = Query(default=False),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    thread = await who.thread(thread_id)
    return await svc.states.get(
        graph_of(thread), thread_id, {"checkpoint_id": checkpoint_id}, subgraphs=subgraphs
    )


@router.post("/threads/{thread_id}/state/checkpoint", response_model=None)
async def post_state_at(
    thread_id: str,
    body: StateAt,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    thread = await who.thread(thread_id)
    return await svc.states.get(
        graph_of(thread), thread_id, body.checkpoint, subgraphs=body.subgraphs
    )


@router.post("/threads/{thread_id}/state", response_model=None)
async def update_state(
    thread_id: str,
    body: StateUpdate,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    thread = await who.thread(thread_id, "update")
    if await svc.runs.active_run(thread_id):
        raise Conflict(f"Thread {thread_id} has an active run; its state cannot be updated now")
    checkpoint = body.checkpoint or (
        {"checkpoint_id": body.checkpoint_id} if body.checkpoint_id else None
    )
    result = await svc.states.update(
        graph_of(thread), thread_id, body.values, as_node=body.as_node, checkpoint=checkpoint
    )
    await svc.threads.touch(thread_id)
    return result


def _before(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"checkpoint_id": value}
    conf = value.get("configurable")
    return conf if isinstance(conf, dict) else value


@router.post("/threads/{thread_id}/history", response_model=None)
async def post_history(
    thread_id: str,
    body: HistoryQuery,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> list[dict[str, Any]]:
    thread = await who.thread(thread_id)
    return await svc.states.history(
        graph_of(thread),
        thread_id,
        limit=body.limit,
        before=_before(body.before),
        metadata=body.metadata,
        checkpoint=body.checkpoint,
    )


@router.get("/threads/{thread_id}/history", response_model=None)
async def get_history(
    thread_id: str,
    limit: int = Query(default=10, ge=1, le=1000),
    before: str | None = Query(default=None),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> list[dict[str, Any]]:
    thread = await who.thread(thread_id)
    return await svc.states.history(
        graph_of(thread), thread_id, limit=limit, before=_before(before)
    )
