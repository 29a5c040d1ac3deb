"""Runs: creation and reads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from api.deps import Services, services
from api.schemas import RunCreate, run_json
from broker.models import RunStatus
from broker.runs import RunRecord, new_id, now_ms

router = APIRouter(tags=["runs"])


async def start_run(svc: Services, thread_id: str, body: RunCreate) -> RunRecord:
    """Validate, record and enqueue a run on `thread_id`."""
    if body.if_not_exists == "create":
        await svc.threads.create(thread_id, if_exists="do_nothing")
    else:
        await svc.threads.get(thread_id)
    svc.registry.graph_id(body.assistant_id)
    ts = now_ms()
    run = RunRecord(
        run_id=new_id(),
        thread_id=thread_id,
        assistant_id=body.assistant_id,
        status=RunStatus.PENDING,
        created_at=ts,
        updated_at=ts,
        metadata=body.metadata or {},
        kwargs=body.run_kwargs(),
        multitask_strategy=body.multitask_strategy,
        on_disconnect=body.on_disconnect,
    )
    job = await svc.runs.create(run)
    await svc.queue.enqueue(job)
    return run


@router.get("/threads/{thread_id}/runs/{run_id}")
async def get_run(thread_id: str, run_id: str, svc: Services = Depends(services)) -> dict[str, Any]:
    return run_json(await svc.runs.find(thread_id, run_id))
