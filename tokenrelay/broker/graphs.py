"""The graph registry and the checkpointer, shared by the API (thread state) and the worker (runs).

A graph spec is ``"package.module:attr"`` or ``"path/to/file.py:attr"``, as in ``langgraph.json``;
the attribute is a compiled graph, an uncompiled ``StateGraph``, or a factory returning either.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import importlib.util
import inspect
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.errors import InvalidUpdateError
from langgraph.graph import StateGraph
from langgraph.pregel import Pregel
from psycopg import DataError as PostgresDataError

from tokenrelay.broker.errors import AssistantNotFound, GraphLoadError

# The Agent Server derives a default assistant id per graph as uuid5(this namespace, graph id).
_ASSISTANT_NAMESPACE = uuid.UUID("6ba7b821-9dad-11d1-80b4-00c04fd430c8")


def assistant_uuid(graph_id: str) -> str:
    return str(uuid.uuid5(_ASSISTANT_NAMESPACE, graph_id))


REJECTED_INPUT: tuple[type[Exception], ...] = (InvalidUpdateError, PostgresDataError, ValueError)
"""What a graph or its checkpointer raises for a caller's bad values, node name, checkpoint or
metadata filter (an unknown node, a list where a dict is expected, a message that cannot be
coerced, a NUL character that Postgres cannot store): the caller's mistake, not the server's."""

_MEMORY_SAVER: InMemorySaver | None = None


SETUP_LOCK = 0x746F6B656E72
"""The Postgres advisory lock key under which the checkpointer's tables are set up."""


@contextlib.asynccontextmanager
async def open_checkpointer(spec: str) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    """The checkpointer TOKENRELAY_CHECKPOINTER names, open for the duration of the context.

    ``memory`` is one saver per process: only that process sees its threads. A
    ``postgresql://`` URL opens a connection pool and creates the tables on first use;
    ``sqlite:///<path>`` shares one file among the processes of one machine (``tokenrelay dev``).
    """
    global _MEMORY_SAVER
    if spec == "memory":
        if _MEMORY_SAVER is None:
            _MEMORY_SAVER = InMemorySaver()
        yield _MEMORY_SAVER
        return
    if spec.startswith(("postgresql://", "postgres://")):
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            spec,
            min_size=1,
            max_size=10,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        )
        try:
            await pool.open(wait=True, timeout=15)
        except Exception as exc:
            raise GraphLoadError(
                f"TOKENRELAY_CHECKPOINTER: cannot connect to Postgres: {exc}"
            ) from exc
        try:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            # Replicas starting together against a fresh database would race creating the
            # tables (UniqueViolation): one sets them up at a time, the others find them made.
            # The lock is polled, not waited for: a session blocked in pg_advisory_lock is an
            # open transaction, which the migrations' CREATE INDEX CONCURRENTLY waits on.
            async with pool.connection() as conn:
                while True:
                    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (SETUP_LOCK,))
                    row = await cur.fetchone()
                    if row is not None and next(iter(row.values())):
                        break
                    await asyncio.sleep(0.1)
                try:
                    await saver.setup()
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
            yield saver
        finally:
            await pool.close()
        return
    if spec.startswith("sqlite:"):
        import aiosqlite
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = spec.removeprefix("sqlite:").removeprefix("//")
        # The processes of one machine share the file (WAL). A writer waits up to 30 s for
        # another's lock rather than failing, and the processes starting together create the
        # tables one at a time: switching to WAL needs the file to itself.
        async with aiosqlite.connect(path, timeout=30) as conn:
            sqlite_saver = AsyncSqliteSaver(conn)
            async with _file_lock(f"{path}.setup-lock", timeout=60):
                await sqlite_saver.setup()
            # In WAL mode, `NORMAL` syncs the log at checkpoints, not at every commit: the file
            # cannot be corrupted, and only a power loss can undo the last commits (SQLite's
            # advice for WAL). Each graph step commits, so this is a sync per step saved.
            await conn.execute("PRAGMA synchronous=NORMAL")
            yield sqlite_saver
        return
    raise GraphLoadError(
        f"TOKENRELAY_CHECKPOINTER={spec!r} is not supported: use 'memory', a postgresql:// URL "
        "or sqlite:///<path>"
    )


@contextlib.asynccontextmanager
async def _file_lock(path: str, timeout: float) -> AsyncIterator[None]:
    """An exclusive lock on `path` between the processes of one machine, polled up to
    `timeout` seconds; the kernel drops it if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GraphLoadError(
                        f"TOKENRELAY_CHECKPOINTER: {path} stayed locked for {timeout:.0f} s"
                    ) from None
                await asyncio.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _import_attr(spec: str, what: str = "graph spec") -> Any:
    if ":" not in spec:
        raise GraphLoadError(f"{what} {spec!r} must look like 'module:attr' or 'file.py:attr'")
    target, attr = spec.rsplit(":", 1)
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target).resolve()
            mod_name = f"tokenrelay_graph_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise GraphLoadError(f"{what} {spec!r}: cannot load file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except GraphLoadError:
        raise
    except Exception as exc:
        raise GraphLoadError(f"{what} {spec!r}: cannot import {target!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise GraphLoadError(f"{what} {spec!r}: {target!r} has no attribute {attr!r}") from None


def import_object(spec: str, what: str) -> Any:
    """The object a ``module:attr`` or ``file.py:attr`` spec names (an auth object, an app),
    `what` naming it in errors."""
    return _import_attr(spec, what)


class GraphRegistry:
    """The configured graphs by id, each bound to the shared checkpointer."""

    def __init__(
        self, specs: dict[str, str], checkpointer: BaseCheckpointSaver[Any] | None
    ) -> None:
        self.specs = dict(specs)
        self.checkpointer = checkpointer
        self._graphs: dict[str, Pregel[Any, Any, Any, Any]] = {}
        self._by_uuid = {assistant_uuid(gid): gid for gid in specs}

    def load_all(self) -> None:
        """Import every graph now, so a wrong spec fails at start with its name."""
        for graph_id in self.specs:
            self.get(graph_id)

    def graph_id(self, assistant_id: str) -> str:
        """Resolve an assistant id (a graph id or its uuid) to a graph id."""
        if assistant_id in self.specs:
            return assistant_id
        try:
            return self._by_uuid[assistant_id]
        except KeyError:
            raise AssistantNotFound(assistant_id) from None

    def get(self, assistant_id: str) -> Pregel[Any, Any, Any, Any]:
        graph_id = self.graph_id(assistant_id)
        graph = self._graphs.get(graph_id)
        if graph is None:
            graph = self._build(graph_id, self.specs[graph_id])
            self._graphs[graph_id] = graph
        return graph

    def _build(self, graph_id: str, spec: str) -> Pregel[Any, Any, Any, Any]:
        obj = _import_attr(spec)
        if not isinstance(obj, (Pregel, StateGraph)) and callable(obj):
            if inspect.iscoroutinefunction(obj):
                raise GraphLoadError(
                    f"graph {graph_id!r} ({spec}): async factories are not supported"
                )
            try:
                obj = obj()
            except Exception as exc:
                raise GraphLoadError(
                    f"graph {graph_id!r} ({spec}): calling it as a graph factory failed: {exc}"
                ) from exc
        if isinstance(obj, StateGraph):
            obj = obj.compile()
        if not isinstance(obj, Pregel):
            raise GraphLoadError(
                f"graph {graph_id!r} ({spec}) is a {type(obj).__name__}, not a LangGraph graph"
            )
        return obj.copy(update={"checkpointer": self.checkpointer})
