"""Assistants: one system assistant per configured graph, as the Agent Server makes them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tokenrelay.api.auth import Caller, Filter, caller, matches
from tokenrelay.api.deps import Services, services
from tokenrelay.api.schemas import iso
from tokenrelay.broker.errors import AssistantNotFound
from tokenrelay.broker.graphs import assistant_uuid

router = APIRouter(tags=["assistants"])

_STARTED = iso(0)


class AssistantSearch(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict[str, Any] | None = None
    graph_id: str | None = None
    name: str | None = None
    limit: int = Field(default=10, ge=0, le=1000)
    offset: int = Field(default=0, ge=0)


def assistant_json(graph_id: str) -> dict[str, Any]:
    return {
        "assistant_id": assistant_uuid(graph_id),
        "graph_id": graph_id,
        "config": {"configurable": {}},
        "context": {},
        "metadata": {"created_by": "system"},
        "name": graph_id,
        "description": None,
        "version": 1,
        "created_at": _STARTED,
        "updated_at": _STARTED,
    }


async def _readable(svc: Services, who: Caller, assistant_id: str) -> str:
    """The graph id of an assistant the caller may read; one it may not is not found."""
    graph_id = svc.registry.graph_id(assistant_id)
    flt = await who.allow("assistants", "read", {"assistant_id": assistant_id})
    if flt and not matches(assistant_json(graph_id)["metadata"], flt):
        raise AssistantNotFound(assistant_id)
    return graph_id


async def _search_filter(who: Caller, body: AssistantSearch) -> Filter | None:
    value = body.model_dump(include={"graph_id", "metadata", "limit", "offset"})
    value["metadata"] = value["metadata"] or {}
    return await who.allow("assistants", "search", value)


def _matching(
    svc: Services, body: AssistantSearch, scope: Filter | None = None
) -> list[dict[str, Any]]:
    return [
        assistant_json(gid)
        for gid in svc.registry.specs
        if (not scope or matches(assistant_json(gid)["metadata"], scope))
        and (body.graph_id is None or gid == body.graph_id)
        and (body.name is None or gid == body.name)
        and all(
            assistant_json(gid)["metadata"].get(k) == v for k, v in (body.metadata or {}).items()
        )
    ]


@router.post("/assistants/search")
async def search_assistants(
    body: AssistantSearch, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> JSONResponse:
    found = _matching(svc, body, await _search_filter(who, body))
    page = found[body.offset : body.offset + body.limit]
    return JSONResponse(page, headers={"X-Pagination-Total": str(len(found))})


@router.post("/assistants/count", response_model=None)
async def count_assistants(
    body: AssistantSearch, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> int:
    return len(_matching(svc, body, await _search_filter(who, body)))


@router.get("/assistants/{assistant_id}/subgraphs", response_model=None)
async def get_subgraphs(
    assistant_id: str,
    recurse: bool = Query(default=False),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    await _readable(svc, who, assistant_id)
    graph = svc.registry.get(assistant_id)
    out: dict[str, Any] = {}
    async for ns, sub in graph.aget_subgraphs(recurse=recurse):
        out[ns] = {
            "input_schema": sub.get_input_jsonschema(),
            "output_schema": sub.get_output_jsonschema(),
            "state_schema": None,
            "config_schema": None,
            "context_schema": None,
        }
    return out


@router.get("/assistants/{assistant_id}")
async def get_assistant(
    assistant_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    return assistant_json(await _readable(svc, who, assistant_id))


@router.get("/assistants/{assistant_id}/graph")
async def get_assistant_graph(
    assistant_id: str,
    xray: str = Query(default="false"),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> dict[str, Any]:
    await _readable(svc, who, assistant_id)
    graph = svc.registry.get(assistant_id)
    depth: int | bool = xray.lower() in ("true", "1") or (int(xray) if xray.isdigit() else False)
    drawable = await graph.aget_graph(xray=depth)
    data: dict[str, Any] = drawable.to_json()
    for node in data.get("nodes", []):
        if isinstance(node.get("data"), dict):
            node["data"].pop("id", None)
    return data


@router.get("/assistants/{assistant_id}/schemas")
async def get_assistant_schemas(
    assistant_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    graph_id = await _readable(svc, who, assistant_id)
    graph = svc.registry.get(assistant_id)

    def schema(fn: str) -> Any:
        try:
            return getattr(graph, fn)()
        except Exception:  # a schema that cannot be rendered is reported as absent
            return None

    return {
        "graph_id": graph_id,
        "input_schema": schema("get_input_jsonschema"),
        "output_schema": schema("get_output_jsonschema"),
        "state_schema": None,
        "config_schema": schema("get_config_jsonschema"),
        "context_schema": schema("get_context_jsonschema"),
    }
