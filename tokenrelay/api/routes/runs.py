"""Runs: create (background, streamed, waited on, stateless), read, list, join and delete."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from tokenrelay.api.auth import Caller, caller, matches
from tokenrelay.api.deps import Services, services
from tokenrelay.api.fanout import Subscription
from tokenrelay.api.schemas import RunCreate, WireJSON, check_id, id_in_path, run_json
from tokenrelay.api.sse import gap_payload
from tokenrelay.broker import codec, telemetry
from tokenrelay.broker.cancel import CancelAction
from tokenrelay.broker.errors import (
    Conflict,
    InvalidBody,
    NoRunToCancel,
    RunNotFound,
    ThreadNotFound,
)
from tokenrelay.broker.models import END_EVENT, ZERO_ID, Event, Gap, RunStatus
from tokenrelay.broker.runs import RunRecord, new_id, now_ms

router = APIRouter(tags=["runs"])


async def start_run(
    svc: Services, thread_id: str | None, body: RunCreate, who: Caller, *, run_id: str | None = None
) -> RunRecord:
    """Validate, authorize, record and enqueue a run on `thread_id` (None: a new thread,
    stateless); a thread it creates gets the metadata the caller's create handler writes.
    `run_id`, when given, is the new run's id (fresh from `new_id`)."""
    graph_id = svc.registry.graph_id(body.assistant_id)
    kwargs = body.run_kwargs()
    if user := who.run_configurable():
        config = dict(kwargs["config"])
        config["configurable"] = {**(config.get("configurable") or {}), **user}
        kwargs["config"] = config
    allowed: dict[str, Any] = {
        "thread_id": thread_id, "assistant_id": body.assistant_id,
        "metadata": dict(body.metadata or {}), "multitask_strategy": body.multitask_strategy,
        "if_not_exists": body.if_not_exists, "kwargs": kwargs,
    }  # fmt: skip
    scope = await who.allow("threads", "create_run", allowed)
    if thread_id is None:
        # A kept thread is an ordinary one; a deleted one is marked for its worker to retire.
        owned: dict[str, Any] = {"graph_id": graph_id}
        if body.on_completion == "delete":
            owned["stateless"] = True
        metadata = await who.new_thread_metadata(None, owned)
        thread = await svc.threads.create(None, metadata)
    elif body.if_not_exists == "create":
        # Created from the path or a chat id: checked as POST /threads checks its body.
        check_id(thread_id)
        metadata = {}
        if not await svc.threads.exists(thread_id):
            metadata = await who.new_thread_metadata(thread_id, {}, "do_nothing")
        thread = await svc.threads.create(thread_id, metadata, if_exists="do_nothing")
    else:
        thread = await svc.threads.get(thread_id)
    if scope and not matches(thread.metadata, scope):
        raise ThreadNotFound(thread.thread_id)
    if "graph_id" not in thread.metadata:
        await svc.threads.update_metadata(
            thread.thread_id, {"graph_id": graph_id, "assistant_id": body.assistant_id}
        )
    ts = now_ms()
    run = RunRecord(
        run_id=run_id or new_id(),
        thread_id=thread.thread_id,
        assistant_id=body.assistant_id,
        status=RunStatus.PENDING,
        created_at=ts,
        updated_at=ts,
        metadata=allowed["metadata"],
        kwargs=kwargs,
        multitask_strategy=body.multitask_strategy,
        on_disconnect=body.on_disconnect,
    )
    try:
        await _record_and_enqueue(svc, run, body.multitask_strategy)
    except Conflict:
        raise
    except BaseException:
        # Compensate, so a start cut short (Redis refusing writes, a lost connection, the
        # client gone) never leaves the thread pointing at a run nobody will execute. If this
        # fails too, `repair_active` frees the thread when the next run asks for it.
        with contextlib.suppress(Exception):
            await asyncio.shield(_abandon(svc, run, "the run could not be queued"))
        raise
    return run


async def _record_and_enqueue(svc: Services, run: RunRecord, strategy: str) -> None:
    """Record the run and claim its thread, in one round trip, then queue it; or queue it
    behind the thread's active run, as `strategy` says."""
    job = svc.runs.job(run)
    enqueue = strategy == "enqueue"
    claim = functools.partial(svc.runs.claim_thread, run.thread_id, run.run_id, mark_busy=False)
    verdict, active = await svc.runs.create_and_claim(run, enqueue=enqueue)
    if verdict == "busy" and await repair_active(svc, run.thread_id, active):
        verdict, active = await claim(enqueue=enqueue)
    elif verdict == "queued":
        # Queued behind the active run: free the thread if that run can never end (this run
        # is then promoted and queued by the repair).
        active = await svc.runs.active_pointer(run.thread_id) or ""
        if active and active != run.run_id:
            await repair_active(svc, run.thread_id, active)
    if verdict == "busy":
        if strategy == "reject":
            await svc.runs.delete(run)
            raise Conflict(
                "Thread is already running a task. Wait for it to finish or choose a different "
                "multitask strategy."
            )
        # interrupt / rollback: stop the active run, then start right after it.
        await cancel_run(svc, await svc.runs.get(active), CancelAction(strategy))
        verdict, _ = await claim(enqueue=True)
    if verdict == "started":
        await svc.runs.queue_started(svc.queue, job)


STALE_START_MS = 5_000
"""A run still unclaimed this long after it was created may be one whose start was cut short
between claiming its thread and queueing it: worth looking for in the queue."""


async def repair_active(svc: Services, thread_id: str, active: str) -> bool:
    """Free the thread if its active run can never end by itself: it has ended (its worker is
    about to release the thread), is gone, or was never queued. Returns whether it did."""
    try:
        run = await svc.runs.get(active)
    except RunNotFound:
        run = None
    if run is not None and not run.status.terminal:
        # A started run is in the queue until it ends (its job is acknowledged after its end
        # is written); one not started yet may be between claiming its thread and the queue.
        unclaimed = run.attempt == 0 and not run.worker
        if unclaimed:
            # Young as the active run: created, or promoted from the thread's queue, lately.
            since = max(run.created_at, run.starts_at, await svc.runs.active_since(thread_id))
            if now_ms() - since <= STALE_START_MS or await svc.queue.contains(active):
                return False
        elif not run.job or await svc.queue.holds(run.job):
            return False
        why = (
            "its start was cut short before it was queued"
            if unclaimed
            else "its job left the queue before it ended (the queue was deleted or lost)"
        )
        return await _abandon(svc, run, why)
    if run is not None:
        # Ended, but its worker stopped before the thread's side of the end (paused, or Redis
        # went away): the thread's next run numbers its events after this one's (a raise
        # only, so a worker that gets there too writes the same).
        await svc.threads.advance_seq(thread_id, await svc.runs.last_seq(active))
    promoted = await svc.runs.release_active(thread_id, active)
    if promoted:
        await svc.queue.enqueue(svc.runs.job(await svc.runs.get(promoted)))
    return True


async def unblock(svc: Services, thread_id: str, waiting: RunRecord | None = None) -> None:
    """For a reader idle while the run it waits for (`waiting`, or any run of the thread) has
    not started: free the thread if its active run can never end (its start was cut short when
    its API process died, or its job was lost), so the queue moves on. Only a waiting reader's
    heartbeat calls it."""
    if waiting is not None and waiting.status is not RunStatus.PENDING:
        return
    active = await svc.runs.active_pointer(thread_id)
    if active and (waiting is None or active != waiting.run_id):
        await repair_active(svc, thread_id, active)


async def _abandon(svc: Services, run: RunRecord, why: str) -> bool:
    """End a run that nothing will end with an error, and free its thread; False when a
    worker started it (or a later attempt of it) meanwhile."""
    message = f"Run {run.run_id} cannot end by itself: {why}"
    error = [Event("error", codec.error_payload("RunNotQueued", message)), Event(END_EVENT, b"")]
    fence = run.attempt if run.attempt > 0 else -1
    if not await svc.log.end_unclaimed(run.run_id, error, RunStatus.ERROR, attempt=fence):
        return False
    await svc.runs.update(run.run_id, error=message)
    promoted = await svc.runs.release_active(run.thread_id, run.run_id)
    if promoted:
        await svc.queue.enqueue(svc.runs.job(await svc.runs.get(promoted)))
    return True


async def cancel_run(svc: Services, run: RunRecord, action: CancelAction) -> None:
    """Ask the run's worker to stop it (a no-op for a run that already ended); a run no worker
    has claimed yet is ended here and now."""
    if run.status.terminal:
        return
    await svc.cancel.request(run.run_id, action, run.worker)
    if run.worker:
        return
    end = [Event(END_EVENT, b"")]
    if not await svc.log.end_unclaimed(run.run_id, end, RunStatus.INTERRUPTED):
        return  # a worker started it meanwhile: it finds the cancel request and stops
    # The job stays in the queue until a worker takes it and finds the run ended.
    promoted = await svc.runs.release_active(run.thread_id, run.run_id)
    if promoted:
        await svc.queue.enqueue(svc.runs.job(await svc.runs.get(promoted)))
    if action is CancelAction.ROLLBACK:
        await svc.runs.delete(run)


async def cancel_and_wait(
    svc: Services, run: RunRecord, action: CancelAction, request: Request | None = None
) -> RunRecord | None:
    """Cancel `run` and return it once it has ended, or None once it is gone (a rollback's
    worker deletes the run just after ending it).

    Bounded: past two leases (time for another worker to take over a run whose worker died)
    or once the client has gone, the run is returned as it is."""
    run_id = run.run_id
    deleted = action is CancelAction.ROLLBACK and not run.status.terminal
    grace = 100  # polls of 50 ms for an ended run to be deleted
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2 * svc.settings.lease_seconds + svc.settings.heartbeat_seconds
    # Subscribed before asking, so the run's last batch cannot slip by unseen.
    async with svc.fanout.subscribe(run_id) as live:
        try:
            run = await _request_cancel(svc, run, action)
            while True:
                if run.status.terminal:
                    if not deleted or grace == 0:
                        return run
                    grace -= 1
                    await live.get(0.05)
                elif loop.time() > deadline or (request and await request.is_disconnected()):
                    return run
                elif not await _ended(live, svc.settings.heartbeat_seconds):
                    continue  # a batch of the run going on: nothing to read
                run = await svc.runs.get(run_id)
        except RunNotFound:
            return None


async def _request_cancel(svc: Services, run: RunRecord, action: CancelAction) -> RunRecord:
    """`cancel_run`, then the run as it is now (it may have ended before the caller
    subscribed): one round trip for a run a worker holds, the common case."""
    if run.status.terminal or not run.worker:
        await cancel_run(svc, run, action)
        return await svc.runs.get(run.run_id)
    pipe = svc.redis.pipeline(transaction=False)
    svc.cancel.request_in(pipe, run.run_id, action, run.worker)
    svc.runs.get_in(pipe, run.run_id)
    *_, h = await pipe.execute()
    return svc.runs.record(run.run_id, h)


async def _ended(live: Subscription, timeout: float) -> bool:
    """Wait for the run's next live batch: whether the run may have ended, i.e. the batch
    holds its `end`, or none came within `timeout`, or some were missed. A batch of a run
    that goes on costs no read of the run (a busy run sends dozens before its end)."""
    batch = await live.get(timeout)
    if live.overflowed:
        live.reset()
        return True
    return batch is None or any(e.is_end for e in batch.entries)


def run_location(run: RunRecord) -> dict[str, str]:
    return {"Content-Location": f"/threads/{id_in_path(run.thread_id)}/runs/{run.run_id}"}


async def final_output(svc: Services, run: RunRecord) -> AsyncIterator[bytes]:
    """The run's result as the Agent Server's /wait and /join give it: the last `values`
    (or `{"__interrupt__": ...}`), or `{"__error__": ...}`; a newline keeps the connection
    alive while the run goes on."""
    last_values: bytes | None = None
    error: bytes | None = None
    gap: Gap | None = None
    async with svc.fanout.subscribe(run.run_id) as live:
        tail = svc.log.tail(run.run_id, ZERO_ID, live, idle_seconds=svc.settings.heartbeat_seconds)
        async for item in tail:
            if item is None:
                now = await svc.runs.get(run.run_id)
                if now.status.terminal and not await svc.log.has_after(run.run_id, ZERO_ID):
                    break
                await unblock(svc, now.thread_id, now)
                yield b"\n"
            elif isinstance(item, Gap):
                telemetry.GAPS.inc()
                gap = item
            elif item.is_end:
                break
            elif item.name == "values":
                last_values = item.data
                gap = None  # a whole state after the gap: the result is complete again
            elif item.name == "error":
                error = item.data
    if error is not None:
        yield b'{"__error__":' + error + b"}"
    elif gap is not None and "values" in run.stream_modes:
        # The last `values` was among the trimmed history: say so rather than pass older
        # values off as the result.
        yield b'{"__error__":' + gap_payload(gap) + b"}"
    elif last_values is not None:
        yield last_values
    else:
        thread = await svc.threads.get(run.thread_id)
        gid = thread.metadata.get("graph_id")
        state = await svc.states.get(gid if isinstance(gid, str) else None, run.thread_id)
        yield codec.json_bytes(state["values"])


def wait_response(svc: Services, run: RunRecord) -> StreamingResponse:
    headers = {
        **run_location(run),
        "Location": f"/threads/{id_in_path(run.thread_id)}/runs/{run.run_id}/join",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    }
    return StreamingResponse(final_output(svc, run), media_type="application/json", headers=headers)


@router.post("/threads/{thread_id}/runs")
async def create_run(
    thread_id: str,
    body: RunCreate,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> JSONResponse:
    run = await start_run(svc, thread_id, body, who)
    return JSONResponse(run_json(run), headers=run_location(run))


@router.post("/runs")
async def create_stateless_run(
    body: RunCreate, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> JSONResponse:
    run = await start_run(svc, None, body, who)
    return JSONResponse(run_json(run), headers=run_location(run))


@router.post("/runs/batch")
async def create_run_batch(
    body: list[RunCreate], svc: Services = Depends(services), who: Caller = Depends(caller)
) -> list[dict[str, Any]]:
    """Several stateless background runs at once."""
    return [run_json(await start_run(svc, None, b, who)) for b in body]


@router.post("/threads/{thread_id}/runs/wait")
async def wait_run(
    thread_id: str,
    body: RunCreate,
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> StreamingResponse:
    return wait_response(svc, await start_run(svc, thread_id, body, who))


@router.post("/runs/wait")
async def wait_stateless_run(
    body: RunCreate, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> StreamingResponse:
    return wait_response(svc, await start_run(svc, None, body, who))


@router.get("/threads/{thread_id}/runs")
async def list_runs(
    thread_id: str,
    limit: int = Query(default=10, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
    status: RunStatus | None = Query(default=None),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> list[dict[str, Any]]:
    await who.thread(thread_id)
    runs = await svc.runs.list(
        thread_id, limit=limit, offset=offset, status=status.value if status else None
    )
    return [run_json(r) for r in runs]


@router.get("/threads/{thread_id}/runs/{run_id}")
async def get_run(
    thread_id: str, run_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> dict[str, Any]:
    await who.thread(thread_id, run_id=run_id)
    return run_json(await svc.runs.find(thread_id, run_id))


@router.get("/threads/{thread_id}/runs/{run_id}/join")
async def join_run(
    thread_id: str, run_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> StreamingResponse:
    await who.thread(thread_id, run_id=run_id)
    return wait_response(svc, await svc.runs.find(thread_id, run_id))


@router.post("/threads/{thread_id}/runs/{run_id}/cancel", response_model=None)
async def cancel_one(
    thread_id: str,
    run_id: str,
    request: Request,
    wait: bool = Query(default=False),
    action: CancelAction = Query(default=CancelAction.INTERRUPT),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> Response | dict[str, Any]:
    """Stop a run. `interrupt` keeps its partial output in the thread (the new checkpoint id
    is the run's `checkpoint_id`); `rollback` undoes it and deletes the run."""
    run, _ = await who.run(thread_id, run_id, "update", action=action.value)
    if not wait:
        await cancel_run(svc, run, action)
        return WireJSON(run_json(run), status_code=202)
    ended = await cancel_and_wait(svc, run, action, request)
    if ended is None:
        return Response(status_code=204)
    if not ended.status.terminal:  # still not ended when the wait ran out
        return WireJSON(run_json(ended), status_code=202)
    return run_json(ended)


class CancelMany(BaseModel):
    model_config = ConfigDict(extra="allow")
    thread_id: str | None = None
    run_ids: list[str] | None = None
    status: Literal["pending", "running", "all"] | None = None


@router.post("/runs/cancel", status_code=204)
async def cancel_many(
    body: CancelMany,
    action: CancelAction = Query(default=CancelAction.INTERRUPT),
    svc: Services = Depends(services),
    who: Caller = Depends(caller),
) -> Response:
    """Cancel runs by id, or whatever is active on a thread (`{"thread_id": ...}` alone)."""
    if body.status is not None:
        raise InvalidBody("cancelling by status is not supported; pass thread_id (and run_ids)")
    if body.thread_id is None:
        raise InvalidBody("thread_id is required")
    await who.thread(body.thread_id, "update", action=action.value)
    run_ids = body.run_ids
    if not run_ids:
        active = await svc.runs.active_run(body.thread_id)
        run_ids = [active] if active else []
    runs = [await svc.runs.find(body.thread_id, rid) for rid in run_ids]
    live = [r for r in runs if not r.status.terminal]
    if not live:
        raise NoRunToCancel("No matching runs to cancel")
    for run in live:
        await cancel_run(svc, run, action)
    return Response(status_code=204)


@router.delete("/threads/{thread_id}/runs/{run_id}", status_code=204)
async def delete_run(
    thread_id: str, run_id: str, svc: Services = Depends(services), who: Caller = Depends(caller)
) -> Response:
    await who.thread(thread_id, "delete", run_id=run_id)
    run = await svc.runs.find(thread_id, run_id)
    if not run.status.terminal:
        raise Conflict(f"Run {run_id} is {run.status.value}; cancel it before deleting it")
    await svc.runs.delete(run)
    return Response(status_code=204)
