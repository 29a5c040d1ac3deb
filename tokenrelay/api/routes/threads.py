"""Threads, their state and history."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from tokenrelay.api.auth import Caller, Filter, caller, matches
from tokenrelay.api.deps import Services, services
from tokenrelay.api.schemas import ThreadCreate, WireJSON, thread_json
from tokenrelay.broker.errors import Conflict, ThreadNotFound
from tokenrelay.broker.thread_index import Matches, indexed
from tokenrelay.broker.threads import ThreadRecord

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
    offset: int = Field(default=0, ge=0, le=1_000_000_000)
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
    if body.thread_id is None:
        # An id made just now: no run or checkpoint can name it yet, so there is nothing to
        # read (a client's own id may name a checkpointer thread whose record expired).
        return WireJSON(thread_json(thread, "idle"))
    return WireJSON(await thread_view(svc, thread))


# Literal paths before /threads/{thread_id}, so they win for every method (OPTIONS too).
@router.post("/threads/search", response_model=None)
async def search_threads(
    body: ThreadSearch, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> WireJSON:
    scoped, scope = await _scoped(who, body)
    if scoped is None:
        return WireJSON([], headers={"X-Pagination-Total": "0"})
    page, total, more = await _search(svc, scoped, scope)
    headers = {"X-Pagination-Total": str(total)}
    if more:
        headers["X-Pagination-Next"] = str(body.offset + body.limit)
    return WireJSON(page, headers=headers)


@router.post("/threads/count", response_model=None)
async def count_threads(
    body: ThreadSearch, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> int:
    scoped, scope = await _scoped(who, body)
    if scoped is None:
        return 0
    body = scoped
    if _needs_reading(body):
        return len(await _read_all(svc, body, scope))
    matches = await _matches(svc, body)
    try:
        if body.status is None and indexed(body.metadata) and not scope:
            return await matches.size()
        found, _ = await _walk(svc, body, matches, skip=0, take=None, scope=scope)
        return len(found)
    finally:
        await matches.close()


async def _scoped(who: Caller, body: ThreadSearch) -> tuple[ThreadSearch | None, Filter | None]:
    """The search narrowed to what the caller's auth handlers allow: an equality filter joins
    the metadata filter (so the index answers it; None when the two contradict), any other
    filter is checked on each candidate."""
    value = body.model_dump(include={"metadata", "values", "status", "limit", "offset", "ids"})
    value["metadata"] = value["metadata"] or {}
    scope = await who.allow("threads", "search", value)
    if not scope:
        return body, None
    if any(isinstance(v, dict) for v in scope.values()):
        return body, scope
    metadata = dict(body.metadata or {})
    for key, want in scope.items():
        if key in metadata and metadata[key] != want:
            return None, None
        metadata[key] = want
    return body.model_copy(update={"metadata": metadata}), None


def _needs_reading(body: ThreadSearch) -> bool:
    """Searches the index cannot answer: by ids (already a short list), by state values, or
    sorted by status."""
    return bool(body.ids) or bool(body.values) or body.sort_by == "status"


async def _matches(svc: Services, body: ThreadSearch) -> Matches:
    return await svc.threads.index.matches(
        metadata=body.metadata,
        status=body.status,
        sort_by=body.sort_by,
        descending=body.sort_order == "desc",
    )


async def _search(
    svc: Services, body: ThreadSearch, scope: Filter | None
) -> tuple[list[dict[str, Any]], int, bool]:
    """One page of matching threads, the total (exact, or the index's upper bound when a
    status filter stopped early) and whether more may follow."""
    if _needs_reading(body):
        found = await _read_all(svc, body, scope)
        end = body.offset + body.limit
        return found[body.offset : end], len(found), end < len(found)
    matches = await _matches(svc, body)
    try:
        if body.status is None and indexed(body.metadata) and not scope:  # all candidates match
            total = await matches.size()
            ids = await matches.page(body.offset, body.limit)
            page = [v for v in [await _matching_view(svc, body, t) for t in ids] if v]
            return page, total, body.offset + body.limit < total
        # A status set (or a filter on long metadata values, not indexed) is a superset: check
        # candidates from the start until the page is full.
        page, exhausted = await _walk(
            svc, body, matches, skip=body.offset, take=body.limit + 1, scope=scope
        )
        more = len(page) > body.limit
        total = body.offset + len(page) if exhausted else await matches.size()
        return page[: body.limit], total, more
    finally:
        await matches.close()


async def _walk(
    svc: Services,
    body: ThreadSearch,
    matches: Matches,
    *,
    skip: int,
    take: int | None,
    scope: Filter | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Candidates checked in order: `take` matching threads after `skip` of them (all with
    None), and whether the candidates ran out."""
    found: list[dict[str, Any]] = []
    seen = start = 0
    batch = min(1000, max(50, 2 * (skip + (take or 0))))
    while take is None or len(found) < take:
        ids = await matches.page(start, batch)
        start += len(ids)
        for tid in ids:
            view = await _matching_view(svc, body, tid, scope)
            if view is None:
                continue
            seen += 1
            if seen > skip and (take is None or len(found) < take):
                found.append(view)
        if len(ids) < batch:
            return found, True
    return found, False


async def _matching_view(
    svc: Services, body: ThreadSearch, tid: str, scope: Filter | None = None
) -> dict[str, Any] | None:
    """The thread's view when it still exists and matches the search (the index may lag)."""
    try:
        thread = await svc.threads.get(tid)
    except ThreadNotFound:  # deleted while we looked
        return None
    if body.metadata and any(thread.metadata.get(k) != v for k, v in body.metadata.items()):
        return None
    if scope and not matches(thread.metadata, scope):
        return None
    view = await thread_view(svc, thread)
    if body.status and view["status"] != body.status:
        return None
    if body.values and any((view["values"] or {}).get(k) != v for k, v in body.values.items()):
        return None
    return view


async def _read_all(
    svc: Services, body: ThreadSearch, scope: Filter | None = None
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for tid in body.ids or await svc.threads.list_ids():
        view = await _matching_view(svc, body, tid, scope)
        if view is not None:
            found.append(view)
    found.sort(key=lambda t: t.get(body.sort_by) or "", reverse=body.sort_order == "desc")
    return found


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
