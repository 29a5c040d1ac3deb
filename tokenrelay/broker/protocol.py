"""The agent streaming protocol's shapes that both processes share: how stored events map to the
protocol's methods and channels, and the few payloads reshaped for it.

A run's events are stored once (see ``tokenrelay/broker/log.py``). Events only this protocol sends
carry a ``~`` name (``tokenrelay.broker.models.PROTOCOL_ONLY``); the modes both protocols share keep
their classic names and payloads and are reshaped here when the protocol's shape differs.
"""

from __future__ import annotations

from typing import Any

from tokenrelay.broker import codec
from tokenrelay.broker.models import (
    INPUT_EVENT,
    LIFECYCLE_EVENT,
    MESSAGES_EVENT,
    PROTOCOL_ONLY,
    TOOLS_EVENT,
)

CHECKPOINT_EVENT = PROTOCOL_ONLY + "c"
"""A checkpoint already in the protocol's shape ({id, parent_id, step, source})."""

CHANNELS = frozenset(
    {"values", "updates", "messages", "tools", "lifecycle", "input", "checkpoints", "tasks",
     "custom"}
)  # fmt: skip
"""The protocol's channels, besides ``custom:<name>``."""

# Stored name -> protocol method, for the names that map one to one.
_METHODS = {
    LIFECYCLE_EVENT: "lifecycle",
    MESSAGES_EVENT: "messages",
    TOOLS_EVENT: "tools",
    INPUT_EVENT: "input.requested",
    CHECKPOINT_EVENT: "checkpoints",
    "values": "values",
    "tasks": "tasks",
}
CHANNEL_OF = {
    "lifecycle": "lifecycle",
    "messages": "messages",
    "tools": "tools",
    "input.requested": "input",
    "checkpoints": "checkpoints",
    "values": "values",
    "tasks": "tasks",
    "updates": "updates",
}


def valid_channel(channel: str) -> bool:
    return channel in CHANNELS or (channel.startswith("custom:") and len(channel) > 7)


def checkpoint_summary(data: dict[str, Any]) -> dict[str, Any]:
    """A LangGraph `checkpoints` stream item (or a state snapshot) in the protocol's shape."""
    configurable = (data.get("config") or {}).get("configurable") or {}
    parent = ((data.get("parent_config") or {}).get("configurable") or {}).get("checkpoint_id")
    metadata = data.get("metadata") or {}
    out: dict[str, Any] = {
        "id": configurable.get("checkpoint_id"),
        "step": metadata.get("step", 0),
        "source": metadata.get("source", "loop"),
    }
    if parent:
        out["parent_id"] = parent
    return out


def to_protocol(base: str, data: bytes) -> tuple[str, str, bytes] | None:
    """(method, channel, data) of a stored event named `base` (its namespace already split
    off), or None for what the protocol does not carry (classic-only shapes, `end`)."""
    method = _METHODS.get(base)
    if method is not None:
        return method, CHANNEL_OF[method], data
    if base == "updates":
        update = codec.json_loads(data)
        if not isinstance(update, dict) or not update or "__interrupt__" in update:
            return None
        node, values = next(iter(update.items()))
        return "updates", "updates", codec.json_bytes({"node": node, "values": values})
    if base == "custom":
        return "custom", "custom", b'{"payload":' + data + b"}"
    if base.startswith("custom:"):
        name = base[7:]
        head = b'{"name":' + codec.json_bytes(name) + b',"payload":'
        return "custom", base, head + data + b"}"
    if base == "error":
        # A token whose stored metadata is gone: said in the message's place, never dropped.
        error = codec.json_loads(data)
        if not isinstance(error, dict) or error.get("error") != "MissingMetadata":
            return None  # a run's failure: its lifecycle event says it
        payload = {"event": "error", "message": str(error.get("message")), "code": "missing"}
        return "messages", "messages", codec.json_bytes(payload)
    if base == "checkpoints":
        summary = checkpoint_summary(codec.json_loads(data))
        return "checkpoints", "checkpoints", codec.json_bytes(summary)
    return None
