"""The only encoders: msgpack for the internal wire, JSON (orjson) for what clients see."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import msgpack
import orjson

_JSON_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _default(obj: Any) -> Any:
    # LangChain messages and other pydantic models: the same dict the Agent Server sends.
    model_dump = getattr(obj, "model_dump", None)
    if callable(model_dump):
        return model_dump()
    to_json = getattr(obj, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, BaseException):
        return {"error": type(obj).__name__, "message": str(obj)}
    return repr(obj)


def json_bytes(obj: Any) -> bytes:
    """Encode `obj` for the wire, once; non-JSON types render as the Agent Server renders them."""
    try:
        return orjson.dumps(obj, default=_default, option=_JSON_OPTS)
    except TypeError:
        # orjson stops at 64-bit integers and lone surrogates; the stdlib encoder does not, and
        # this is rare. ASCII output escapes a lone surrogate instead of failing to encode it.
        return json.dumps(
            obj, default=_default, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode()


class _Opaque:
    """An object orjson does not encode by itself."""


def warm_up() -> None:
    """Meet orjson's one-off cost at start. The first time it is given an object it does not
    encode by itself (a LangChain message chunk: the first token of a process's first run), it
    looks up numpy's types for `OPT_SERIALIZE_NUMPY`, importing numpy where it is installed:
    about 40 ms, during which every run of the process would stall."""
    json_bytes(_Opaque())


def canonical_json(obj: Any) -> bytes:
    """One encoding per JSON value whatever its key order: for digests of values."""
    try:
        return orjson.dumps(obj, default=_default, option=_JSON_OPTS | orjson.OPT_SORT_KEYS)
    except TypeError:  # integers past 64 bits, as in json_bytes
        return json.dumps(
            obj, default=_default, separators=(",", ":"), sort_keys=True, allow_nan=False
        ).encode()


def json_loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def json_fragment(data: bytes) -> orjson.Fragment:
    """Embed already-encoded JSON in a larger document without decoding it."""
    return orjson.Fragment(data)


def pack(obj: Any) -> bytes:
    """msgpack for queue jobs, pub/sub batches and control messages."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def pack_script_args(obj: Any) -> bytes:
    """msgpack for a Lua script to read with ``cmsgpack.unpack``: bytes and str both as raw
    strings, since Redis 7's cmsgpack reads no bin type (raw strings are binary-safe)."""
    return msgpack.packb(obj, use_bin_type=False)


def splice_tuple(first: bytes, second: bytes) -> bytes:
    """``[<first>,<second>]`` from two encoded JSON values, without decoding either."""
    return b"".join((b"[", first, b",", second, b"]"))  # one copy of the (long) second


CONTENT_HEAD = b'{"content":'


def splice_content(content: bytes, rest: bytes) -> bytes:
    """``[{"content":<content>,<rest>]``: a message chunk stored as its content alone."""
    return b"".join((b"[", CONTENT_HEAD, content, b",", rest, b"]"))  # one copy of `rest`


def split_content(chunk: bytes, content: bytes) -> bytes | None:
    """The rest of an encoded chunk after its leading ``"content"`` member, or None when the
    chunk does not start with exactly that member."""
    head = CONTENT_HEAD + content + b","
    return chunk[len(head) :] if chunk.startswith(head) else None


def error_payload(error: str, message: str) -> bytes:
    return json_bytes({"error": error, "message": message})


def unpack_raw(data: bytes) -> Any:
    """msgpack with strings left as bytes: for payloads that go to the wire untouched."""
    return msgpack.unpackb(data, raw=True)
