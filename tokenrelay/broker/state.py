"""Thread state as the Agent Server shows it, read and written through the checkpointer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tokenrelay.broker.errors import InvalidState
from tokenrelay.broker.graphs import REJECTED_INPUT, GraphRegistry


def _checkpoint(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if not config:
        return None
    conf = config.get("configurable") or {}
    out = {
        "thread_id": conf.get("thread_id"),
        "checkpoint_ns": conf.get("checkpoint_ns", ""),
        "checkpoint_id": conf.get("checkpoint_id"),
    }
    if conf.get("checkpoint_map"):
        out["checkpoint_map"] = conf["checkpoint_map"]
    return out


def _task(task: Any) -> dict[str, Any]:
    state = task.state
    nested: dict[str, Any] | None = None
    ckpt: dict[str, Any] | None = None
    if isinstance(state, dict):
        ckpt = state.get("configurable")
    elif state is not None:
        nested = snapshot_json(state)
    return {
        "id": task.id,
        "name": task.name,
        "path": list(getattr(task, "path", ()) or ()),
        "error": None if task.error is None else f"{type(task.error).__name__}: {task.error}",
        "interrupts": [{"value": i.value, "id": i.id} for i in task.interrupts],
        "checkpoint": ckpt,
        "state": nested,
        "result": getattr(task, "result", None),
    }


def snapshot_json(snap: Any) -> dict[str, Any]:
    """A LangGraph StateSnapshot as the Agent Server's ThreadState."""
    checkpoint = _checkpoint(snap.config)
    parent = _checkpoint(snap.parent_config)
    created = snap.created_at
    if isinstance(created, datetime):
        created = created.astimezone(UTC).isoformat()
    interrupts = [{"value": i.value, "id": i.id} for i in getattr(snap, "interrupts", ()) or ()]
    return {
        "values": snap.values,
        "next": list(snap.next),
        "tasks": [_task(t) for t in snap.tasks],
        "metadata": snap.metadata,
        "created_at": created,
        "checkpoint": checkpoint,
        "parent_checkpoint": parent,
        "interrupts": interrupts,
        "checkpoint_id": checkpoint["checkpoint_id"] if checkpoint else None,
        "parent_checkpoint_id": parent["checkpoint_id"] if parent else None,
    }


EMPTY_STATE: dict[str, Any] = {
    "values": {},
    "next": [],
    "tasks": [],
    "metadata": None,
    "created_at": None,
    "checkpoint": None,
    "parent_checkpoint": None,
    "interrupts": [],
    "checkpoint_id": None,
    "parent_checkpoint_id": None,
}


def _config(thread_id: str, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread_id}
    for key in ("checkpoint_id", "checkpoint_ns", "checkpoint_map"):
        if checkpoint and checkpoint.get(key) is not None:
            conf[key] = checkpoint[key]
    if "checkpoint_id" in conf:  # a checkpoint is named in a namespace: the root one by default
        conf.setdefault("checkpoint_ns", "")
    return {"configurable": conf}


class ThreadStates:
    """Reads and writes a thread's checkpoints through the graph that runs on it."""

    def __init__(self, registry: GraphRegistry) -> None:
        self._registry = registry

    def _graph(self, graph_id: str | None) -> Any:
        if graph_id and graph_id in self._registry.specs:
            return self._registry.get(graph_id)
        return self._registry.get(next(iter(self._registry.specs)))

    async def get(
        self,
        graph_id: str | None,
        thread_id: str,
        checkpoint: dict[str, Any] | None = None,
        *,
        subgraphs: bool = False,
    ) -> dict[str, Any]:
        graph = self._graph(graph_id)
        if graph.checkpointer is None:
            return dict(EMPTY_STATE)
        try:
            snap = await graph.aget_state(_config(thread_id, checkpoint), subgraphs=subgraphs)
        except REJECTED_INPUT as exc:
            raise InvalidState("checkpoint", exc) from None
        if snap.config is None or not snap.created_at:
            return dict(EMPTY_STATE)
        return snapshot_json(snap)

    async def history(
        self,
        graph_id: str | None,
        thread_id: str,
        *,
        limit: int,
        before: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        graph = self._graph(graph_id)
        out: list[dict[str, Any]] = []
        try:
            async for snap in graph.aget_state_history(
                _config(thread_id, checkpoint),
                limit=limit,
                before=_config(thread_id, before) if before else None,
                filter=metadata or None,
            ):
                out.append(snapshot_json(snap))
        except REJECTED_INPUT as exc:
            raise InvalidState("history query", exc) from None
        return out

    async def update(
        self,
        graph_id: str | None,
        thread_id: str,
        values: Any,
        *,
        as_node: str | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write `values` as a new checkpoint; returns its checkpoint (Agent Server shape)."""
        graph = self._graph(graph_id)
        try:
            config = await graph.aupdate_state(
                _config(thread_id, checkpoint), values, as_node=as_node
            )
        except REJECTED_INPUT as exc:
            raise InvalidState("state update", exc) from None
        ckpt = _checkpoint(config)
        return {
            "checkpoint": ckpt,
            "configurable": config.get("configurable", {}),
            "checkpoint_id": ckpt["checkpoint_id"] if ckpt else None,
        }

    async def delete(self, thread_id: str) -> None:
        saver = self._registry.checkpointer
        if saver is not None:
            await saver.adelete_thread(thread_id)

    async def copy(self, source: str, target: str) -> None:
        """Copy every checkpoint (and pending write) of `source` to `target`."""
        saver = self._registry.checkpointer
        if saver is None:
            return
        try:
            await saver.acopy_thread(source, target)
            return
        except NotImplementedError:
            pass  # the in-memory saver has no copy: replay its checkpoints into the target
        tuples = [t async for t in saver.alist({"configurable": {"thread_id": source}})]
        for tup in reversed(tuples):  # oldest first, so each parent exists before its child
            conf = dict(tup.config["configurable"])
            parent = (tup.parent_config or {}).get("configurable", {}).get("checkpoint_id")
            into: dict[str, Any] = {
                "configurable": {
                    "thread_id": target,
                    "checkpoint_ns": conf.get("checkpoint_ns", ""),
                    **({"checkpoint_id": parent} if parent else {}),
                }
            }
            checkpoint = tup.checkpoint
            saved = await saver.aput(
                into,  # type: ignore[arg-type]
                checkpoint,
                tup.metadata,
                dict(checkpoint["channel_versions"]),
            )
            by_task: dict[str, list[tuple[str, Any]]] = {}
            for task_id, channel, value in tup.pending_writes or ():
                by_task.setdefault(task_id, []).append((channel, value))
            for task_id, writes in by_task.items():
                await saver.aput_writes(saved, writes, task_id)
