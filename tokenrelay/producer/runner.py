"""Runs one graph for one run and turns what it streams into wire events."""

from __future__ import annotations

import copy
import logging
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable
from typing import Any, ClassVar

from langchain_core._api.beta_decorator import LangChainBetaWarning
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    message_chunk_to_message,
)
from langchain_core.messages.ai import add_ai_message_chunks
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.stream import ProtocolEvent, StreamTransformer
from langgraph.types import Command

from tokenrelay.broker import codec
from tokenrelay.broker.graphs import GraphRegistry
from tokenrelay.broker.models import (
    INPUT_EVENT,
    LIFECYCLE_EVENT,
    MESSAGES_EVENT,
    TOOLS_EVENT,
    Entry,
    Event,
)
from tokenrelay.broker.protocol import CHECKPOINT_EVENT, checkpoint_summary
from tokenrelay.broker.runs import RunRecord

log = logging.getLogger("tokenrelay.runner")

# Wire stream mode -> LangGraph stream mode.
_GRAPH_MODE = {
    "values": "values",
    "updates": "updates",
    "messages-tuple": "messages",
    "messages": "messages",
    "custom": "custom",
    "debug": "debug",
    "tasks": "tasks",
    "checkpoints": "checkpoints",
}
STREAM_MODES = frozenset({*_GRAPH_MODE, "events"})
"""`events` is LangChain's event stream (``astream_events(version="v2")``): the graph is run
through it, and the other modes are read from the root's `on_chain_stream` events."""

AGENT_PROTOCOL = "agent"
"""`stream_protocol` of runs started through the agent streaming protocol (``run.start``)."""

_DELTA_HEAD = b'{"event":"content-block-delta","index":%d,"delta":{"type":"text-delta","text":'


class _WireModes(StreamTransformer):
    """Asks a v3 event stream for every mode the agent protocol has a channel for; the events
    themselves pass through the stream unchanged."""

    required_stream_modes: ClassVar[tuple[str, ...]] = (
        "updates",
        "custom",
        "tasks",
        "checkpoints",
        "tools",
    )

    def init(self) -> dict[str, Any]:
        return {}

    def process(self, event: ProtocolEvent) -> bool:
        return True


def _ns_suffix(ns: tuple[str, ...] | list[str]) -> str:
    return "|" + "|".join(ns) if ns else ""


def protocol_message_event(suffix: str, event: dict[str, Any], node: str) -> Event:
    """A protocol `messages` event stored lean: a text delta keeps only its text per entry; the
    rest (and the node) is a blob stored once per run (see `tokenrelay.broker.log.BlobResolver`)."""
    if (
        event.get("event") == "content-block-delta"
        and isinstance(event.get("index"), int)
        and len(event) == 3
    ):
        delta = event.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "text-delta" and len(delta) == 2:
            head = _DELTA_HEAD % event["index"]
            return Event(
                MESSAGES_EVENT + suffix,
                codec.json_bytes(delta["text"]),
                blob=node.encode() + b"\x00" + head,
                content_only=True,
            )
    return Event(MESSAGES_EVENT + suffix, codec.json_bytes(event), blob=node.encode())


def _whole_message_events(message: BaseMessage) -> list[dict[str, Any]]:
    """A message a node returned whole (not streamed), as the protocol's message events."""
    if not isinstance(message, AIMessage):
        return []  # user input is in `values`; tool results are on the `tools` channel
    out: list[dict[str, Any]] = [{"event": "message-start", "role": "ai", "id": message.id or ""}]
    for index, block in enumerate(message.content_blocks):
        content = {k: v for k, v in dict(block).items() if k != "index"}
        start = {**content, "text": ""} if content.get("type") == "text" else content
        out.append({"event": "content-block-start", "index": index, "content": start})
        out.append({"event": "content-block-finish", "index": index, "content": content})
    finish: dict[str, Any] = {"event": "message-finish"}
    if message.usage_metadata:
        finish["usage"] = dict(message.usage_metadata)
    out.append(finish)
    return out


def _message_of(data: dict[str, Any]) -> BaseMessage:
    """A message as a `messages` event carries it (its `model_dump`)."""
    if data.get("type") == "AIMessageChunk":
        return AIMessageChunk.model_validate(data)
    if data.get("type") == "ai":
        return AIMessage.model_validate(data)
    return BaseMessage.model_construct(**data)  # not the AI's: tracked as a whole message


def run_config(run: RunRecord, graph_id: str) -> dict[str, Any]:
    """The RunnableConfig of a run: the client's config plus thread and run identity."""
    user = dict(run.kwargs.get("config") or {})
    configurable = dict(user.get("configurable") or {})
    configurable.update(
        thread_id=run.thread_id, run_id=run.run_id, assistant_id=run.assistant_id, graph_id=graph_id
    )
    checkpoint_id = run.kwargs.get("checkpoint_id")
    if checkpoint_id:
        configurable["checkpoint_id"] = checkpoint_id
    metadata = dict(user.get("metadata") or {})
    metadata.update(run.metadata)
    metadata.update(
        run_id=run.run_id,
        thread_id=run.thread_id,
        assistant_id=run.assistant_id,
        graph_id=graph_id,
        run_attempt=run.attempt,
    )
    config: dict[str, Any] = {**user, "configurable": configurable, "metadata": metadata}
    config.setdefault("recursion_limit", 25)
    return config


class _MessageAccumulator:
    """Renders the legacy `messages` mode: metadata once, then the accumulated partial message."""

    def __init__(self) -> None:
        self._partials: dict[str, BaseMessageChunk] = {}

    def events(self, suffix: str, message: BaseMessage, meta: dict[str, Any]) -> list[Event]:
        msg_id = message.id or ""
        out: list[Event] = []
        if isinstance(message, BaseMessageChunk):
            known = self._partials.get(msg_id)
            if known is None:
                out.append(
                    Event(
                        "messages/metadata" + suffix,
                        codec.json_bytes({msg_id: {"metadata": meta}}),
                    )
                )
                merged = message
            else:
                merged = known + message
            self._partials[msg_id] = merged
            out.append(Event("messages/partial" + suffix, codec.json_bytes([merged])))
        else:
            if msg_id not in self._partials:
                out.append(
                    Event(
                        "messages/metadata" + suffix,
                        codec.json_bytes({msg_id: {"metadata": meta}}),
                    )
                )
            self._partials.pop(msg_id, None)
            out.append(Event("messages/complete" + suffix, codec.json_bytes([message])))
        return out


class _MetadataJSON:
    """Encodes a message's `messages` metadata once: LangGraph hands every chunk of one model
    call the same metadata dict, about 1 KB of JSON that would otherwise be encoded per token."""

    def __init__(self) -> None:
        self._last: tuple[dict[str, Any], bytes] | None = None

    def __call__(self, meta: dict[str, Any]) -> bytes:
        last = self._last
        if last is not None and last[0] is meta:
            return last[1]
        encoded = codec.json_bytes(meta)
        self._last = (meta, encoded)  # holding the dict keeps its identity from being reused
        return encoded


def _tuple_event(name: str, message: BaseMessage, meta_json: bytes) -> Event:
    """A `messages` event stored lean: the chunk's content per entry, the rest of the chunk
    and its metadata (the same from token to token) once per run."""
    chunk = codec.json_bytes(message)
    if isinstance(message.content, str):
        content = codec.json_bytes(message.content)
        rest = codec.split_content(chunk, content)
        if rest:
            return Event(name, content, blob=rest + b"," + meta_json, content_only=True)
    return Event(name, chunk, blob=meta_json)


class _TupleEvents:
    """Encodes `messages-tuple` events, each message's invariant part once: the chunks of one
    message differ in their content alone, so the rest of the chunk and its metadata are
    encoded for its first chunk and reused while every other field stays equal."""

    def __init__(self) -> None:
        self._meta_json = _MetadataJSON()
        # (chunk class, its fields but content, its extra fields, metadata JSON, blob)
        self._last: tuple[type, dict[str, Any], Any, bytes, bytes] | None = None

    def __call__(self, name: str, message: BaseMessage, meta: dict[str, Any]) -> Event:
        meta_json = self._meta_json(meta)
        if not isinstance(message.content, str):
            return _tuple_event(name, message, meta_json)
        fields = message.__dict__.copy()  # in C, unlike a comprehension that leaves one out
        fields.pop("content", None)
        extra = message.__pydantic_extra__
        last = self._last
        if (
            last is not None
            and last[0] is type(message)
            and last[3] is meta_json
            and last[1] == fields
            and last[2] == extra
        ):
            return Event(name, codec.json_bytes(message.content), blob=last[4], content_only=True)
        event = _tuple_event(name, message, meta_json)
        if event.content_only and event.blob is not None:
            # Copies: a model could change a dict of a chunk it already handed over.
            self._last = (type(message), copy.deepcopy(fields), copy.deepcopy(extra), meta_json,
                          event.blob)  # fmt: skip
        return event


class GraphRun:
    """Executes a run's graph with the requested stream modes and yields its events in order."""

    def __init__(self, registry: GraphRegistry, run: RunRecord) -> None:
        self.run = run
        self.graph_id = registry.graph_id(run.assistant_id)
        self.graph = registry.get(run.assistant_id)
        self.modes = [m for m in run.stream_modes if m in STREAM_MODES] or ["values"]
        self._accumulator = _MessageAccumulator()
        self.resume = False
        self.interrupted = False
        """Whether the graph stopped on an interrupt (it waits for input)."""
        self._current = ""
        self._tuple_events = _TupleEvents()
        # protocol runs: message id -> (its text so far, node, step)
        self._texts: dict[str, tuple[list[str], str, int]] = {}
        # message id -> (its chunks so far, top-level node that streamed it, step). The chunks
        # are merged only if the run is cancelled: merging per token would cost the worker more
        # than everything else it does for that token.
        self._partials: dict[str, tuple[list[AIMessageChunk], str, int]] = {}
        self._replayed = False
        self.streamed = False
        """Whether this attempt streamed a message (a `messages` chunk or protocol event)."""

    async def prepare(self) -> None:
        """On a later attempt, continue from the run's last checkpoint if it wrote one."""
        if self.run.attempt <= 1 or self.graph.checkpointer is None:
            return
        state = await self.graph.aget_state({"configurable": {"thread_id": self.run.thread_id}})
        metadata = state.metadata or {}
        self.resume = metadata.get("run_id") == self.run.run_id
        if self.resume:
            log.info(
                "resuming run from checkpoint %s",
                state.config["configurable"].get("checkpoint_id"),
                extra={"run_id": self.run.run_id, "attempt": self.run.attempt},
            )

    def _track(self, message: BaseMessage, meta: dict[str, Any], ns: tuple[str, ...]) -> None:
        if not isinstance(message, AIMessageChunk) or not message.id:
            self.streamed = True
            self._partials.pop(message.id or "", None)  # a whole message: nothing is partial
            return
        known = self._partials.get(message.id)
        if known is not None:  # per token: no more than this
            known[0].append(message)
            return
        self.streamed = True  # a message's first chunk
        # Inside a subgraph the thread's node is the first namespace segment ("node:task").
        path = ns or tuple(str(meta.get("langgraph_checkpoint_ns", "")).split("|"))[:-1]
        node = path[0].split(":")[0] if path else meta.get("langgraph_node", "")
        step = int(meta.get("langgraph_step") or 0)
        self._partials[message.id] = ([message], str(node), step)

    def replay(self, entries: Iterable[Entry]) -> None:
        """Track the messages an earlier attempt streamed, from the run's stored events, as if
        this run had streamed them: a cancel carried out between attempts (its worker gone)
        keeps what that attempt's clients saw. Only the last attempt that streamed a message
        counts: a later attempt starts over from the thread's last checkpoint."""
        self._replayed = True
        attempt = streaming = 0
        metadata: dict[str, Any] = {}  # legacy `messages` mode: message id -> its metadata
        for index, entry in enumerate(entries):
            mode, _, rest = entry.name.partition("|")
            ns = tuple(rest.split("|")) if rest else ()
            if mode == "metadata":
                attempt = int(codec.json_loads(entry.data).get("attempt") or attempt)
                continue
            if mode != MESSAGES_EVENT and not mode.startswith("messages"):
                continue
            if streaming != attempt:  # this attempt's first message: the last one's are moot
                self._partials.clear()
                self._texts.clear()
                streaming = attempt
            data = codec.json_loads(entry.data)
            if self.protocol:
                if mode == MESSAGES_EVENT and isinstance(data, dict):
                    node = entry.node.decode() if entry.node else ""
                    # Later events win where steps tie: the order is the stream's.
                    self._track_protocol(data, {"langgraph_node": node, "langgraph_step": index},
                                         ns)  # fmt: skip
            elif mode == "messages":  # messages-tuple: [chunk, metadata]
                self._track(_message_of(data[0]), data[1], ns)
            elif mode == "messages/metadata":
                metadata.update({k: (v or {}).get("metadata") or {} for k, v in data.items()})
            elif mode == "messages/partial":  # the message so far, whole
                message = _message_of(data[0])
                self._partials.pop(message.id or "", None)
                self._track(message, metadata.get(message.id or "", {}), ns)
            elif mode == "messages/complete":
                for message in data:
                    self._partials.pop(str(message.get("id") or ""), None)

    def _completed(self, update: dict[str, Any]) -> None:
        """A node completed with `update` (its output, by node): the messages it returned are
        whole, none of them partial any more."""
        for output in update.values():
            found = output.get("messages") if isinstance(output, dict) else None
            for message in found if isinstance(found, list) else [found]:
                if isinstance(message, BaseMessage) and message.id:
                    self._partials.pop(message.id, None)

    def partial_message(self, saved: frozenset[str] = frozenset()) -> tuple[AIMessage, str] | None:
        """The AI message that was streaming when the run stopped, marked as cancelled, and the
        node that streamed it. Messages whose ids are in `saved` (the thread has them: their
        node completed) are not partial."""
        for msg_id, (texts, node_of, step) in self._texts.items():
            chunk = AIMessageChunk(content="".join(texts), id=msg_id)
            self._partials.setdefault(msg_id, ([chunk], node_of, step))
        partials = [p for msg_id, p in self._partials.items() if msg_id not in saved]
        if not partials:
            return None
        chunks, node, _ = max(partials, key=lambda p: p[2])
        first, *rest = chunks
        merged = add_ai_message_chunks(first, *rest) if rest else first
        message = message_chunk_to_message(merged)
        if not isinstance(message, AIMessage):
            return None
        if message.tool_calls or message.invalid_tool_calls:
            # A tool call cut short has no tool result and may not even parse; a model given
            # it on the next turn would fail. Keep it for the record, outside `tool_calls`.
            cut = [dict(c) for c in [*message.tool_calls, *message.invalid_tool_calls]]
            message = AIMessage(
                content=message.content,
                id=message.id,
                name=message.name,
                additional_kwargs={**message.additional_kwargs, "cancelled_tool_calls": cut},
                response_metadata=message.response_metadata,
                usage_metadata=message.usage_metadata,
            )
        message.response_metadata = {
            **message.response_metadata,
            "finish_reason": "cancelled",
            "cancelled": True,
        }
        message.additional_kwargs = {**message.additional_kwargs, "cancelled": True}
        return message, node

    async def save_partial(self) -> tuple[str | None, Any]:
        """Write the partial message into the thread as its node's output; returns the new
        checkpoint id and the saved state's values."""
        config: RunnableConfig = {"configurable": {"thread_id": self.run.thread_id}}
        saved: frozenset[str] = frozenset()
        if self._replayed:
            # Replayed events may not say which nodes completed: the thread does.
            before = await self.graph.aget_state(config)
            values = before.values if isinstance(before.values, dict) else {}
            saved = frozenset(str(m.id) for m in values.get("messages") or ()
                              if isinstance(m, BaseMessage) and m.id)  # fmt: skip
        found = self.partial_message(saved)
        if found is not None:
            message, node = found
            await self.graph.aupdate_state(config, {"messages": [message]}, as_node=node or None)
        state = await self.graph.aget_state({"configurable": {"thread_id": self.run.thread_id}})
        checkpoint_id = (state.config or {}).get("configurable", {}).get("checkpoint_id")
        return checkpoint_id, state.values

    async def rollback(self) -> None:
        """Put the thread back where it was before this run: fork from the last checkpoint
        another run wrote, or clear the thread if this run was its first."""
        config: RunnableConfig = {"configurable": {"thread_id": self.run.thread_id}}
        async for snap in self.graph.aget_state_history(config):
            if (snap.metadata or {}).get("run_id") != self.run.run_id:
                await self.graph.aupdate_state(snap.config, None)
                return
        saver = self.graph.checkpointer
        if isinstance(saver, BaseCheckpointSaver):
            await saver.adelete_thread(self.run.thread_id)

    def _input(self) -> Any:
        if self.resume:
            return None
        command = self.run.kwargs.get("command")
        if command:
            return Command(**command)
        return self.run.kwargs.get("input")

    @property
    def protocol(self) -> bool:
        return self.run.kwargs.get("stream_protocol") == AGENT_PROTOCOL

    def _track_protocol(self, event: dict[str, Any], meta: dict[str, Any], ns: tuple[str, ...]
    ) -> None:  # fmt: skip
        """Keep what a cancel needs to save the partial message: the text streamed so far."""
        kind = event.get("event")
        if kind == "message-start":
            self.streamed = True
            if event.get("role", "ai") != "ai" or not event.get("id"):
                return
            self._current = str(event["id"])
            node = ns[0].split(":")[0] if ns else str(meta.get("langgraph_node", ""))
            # The text alone, per token; the message is built only if the run is cancelled.
            self._texts[self._current] = ([], node, int(meta.get("langgraph_step") or 0))
        elif kind == "content-block-delta" and self._current in self._texts:
            delta = event.get("delta") or {}
            if delta.get("type") == "text-delta":
                self._texts[self._current][0].append(str(delta.get("text", "")))
        elif kind == "message-finish":
            self._texts.pop(self._current, None)

    def _graph_kwargs(self) -> dict[str, Any]:
        """The run's context, interrupt_before/after and durability, as the graph's stream
        takes them."""
        kwargs: dict[str, Any] = {}
        context = self.run.kwargs.get("context")
        if context:
            kwargs["context"] = context
        for key in ("interrupt_before", "interrupt_after", "durability"):
            if self.run.kwargs.get(key):
                kwargs[key] = self.run.kwargs[key]
        return kwargs

    async def protocol_events(self) -> AsyncIterator[Event]:
        """The run as the agent streaming protocol's events, from LangGraph's own protocol
        event stream (``astream_events(version="v3")``)."""
        kwargs = self._graph_kwargs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LangChainBetaWarning)
            stream = await self.graph.astream_events(  # type: ignore[call-overload]
                self._input(),
                run_config(self.run, self.graph_id),
                version="v3",
                transformers=[_WireModes],
                **kwargs,
            )
        async for item in stream:
            params = item["params"]
            method, data = item["method"], params["data"]
            ns = tuple(params["namespace"])
            suffix = _ns_suffix(ns)
            if method == "messages":
                message, meta = data
                node = str(meta.get("langgraph_node", ""))
                if isinstance(message, BaseMessage):
                    self._texts.pop(message.id or "", None)
                    for event in _whole_message_events(message):
                        yield protocol_message_event(suffix, event, node)
                    continue
                self._track_protocol(message, meta, ns)
                yield protocol_message_event(suffix, message, node)
            elif method == "values":
                yield Event("values" + suffix, codec.json_bytes(data))
                for interrupt in params.get("interrupts") or ():
                    self.interrupted = True
                    payload = {"interrupt_id": interrupt.id, "payload": interrupt.value}
                    yield Event(INPUT_EVENT + suffix, codec.json_bytes(payload))
            elif method == "lifecycle":
                # A subgraph's lifecycle is announced under its own namespace.
                own = {k: v for k, v in data.items() if k != "namespace"}
                where = _ns_suffix(data.get("namespace") or ns)
                yield Event(LIFECYCLE_EVENT + where, codec.json_bytes(own))
            elif method == "tools":
                yield Event(TOOLS_EVENT + suffix, codec.json_bytes(data))
            elif method == "checkpoints":
                yield Event(CHECKPOINT_EVENT + suffix, codec.json_bytes(checkpoint_summary(data)))
            elif method == "updates" and isinstance(data, dict) and "__interrupt__" in data:
                continue  # interrupts go out on `input`, from the `values` that carries them
            else:
                yield Event(method + suffix, codec.json_bytes(data))

    async def _with_events(
        self,
        config: dict[str, Any],
        graph_modes: list[str],
        subgraphs: bool,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[Any]:
        """The graph run through LangChain's event stream: each event as an `events` Event,
        except the root's `on_chain_stream`, whose chunk is what `astream` would have yielded
        (the other modes); events tagged hidden stay hidden, as in LangSmith."""
        root = uuid.uuid4()
        config = {**config, "run_id": root}
        stream = self.graph.astream_events(  # type: ignore[call-overload]
            self._input(),
            config,
            version="v2",
            stream_mode=graph_modes,
            subgraphs=subgraphs,
            **kwargs,
        )
        async for event in stream:
            if event["event"] == "on_chain_stream" and event["run_id"] == str(root):
                yield event["data"]["chunk"]
            elif "langsmith:hidden" not in (event.get("tags") or ()):
                yield Event("events", codec.json_bytes(event))

    async def events(self) -> AsyncIterator[Event]:
        if self.protocol:
            async for event in self.protocol_events():
                yield event
            return
        # `messages` is always streamed internally: a cancel turns the chunks into the partial
        # message it keeps, whether or not the client asked for them.
        # `updates` too: an interrupt shows there, and the protocol's `input` channel needs it.
        graph_modes = sorted(
            {_GRAPH_MODE[m] for m in self.modes if m in _GRAPH_MODE} | {"messages", "updates"}
        )
        kwargs = self._graph_kwargs()
        subgraphs = bool(self.run.kwargs.get("subgraphs"))
        config = run_config(self.run, self.graph_id)
        if "events" in self.modes:
            stream = self._with_events(config, graph_modes, subgraphs, kwargs)
        else:
            stream = self.graph.astream(  # type: ignore[call-overload]
                self._input(),
                config,  # type: ignore[arg-type]
                stream_mode=graph_modes,  # type: ignore[arg-type]
                subgraphs=subgraphs,
                **kwargs,
            )
        async for chunk in stream:
            if isinstance(chunk, Event):
                yield chunk
                continue
            ns, mode, data = chunk if subgraphs else ((), *chunk)
            suffix = "|" + "|".join(ns) if ns else ""
            if mode == "messages":
                message, meta = data
                self._track(message, meta, ns)
                if "messages-tuple" in self.modes:
                    yield self._tuple_events("messages" + suffix, message, meta)
                if "messages" in self.modes:
                    for event in self._accumulator.events(suffix, message, meta):
                        yield event
            else:
                if mode == "updates" and isinstance(data, dict):
                    self._completed(data)
                    if "__interrupt__" in data:  # empty at a static breakpoint
                        self.interrupted = True
                    for interrupt in data.get("__interrupt__") or ():
                        payload = {"interrupt_id": interrupt.id, "payload": interrupt.value}
                        yield Event(INPUT_EVENT + suffix, codec.json_bytes(payload))
                if mode != "updates" or "updates" in self.modes:
                    yield Event(mode + suffix, codec.json_bytes(data))
