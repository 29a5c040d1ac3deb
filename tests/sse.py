"""A strict SSE reader for tests: parses exactly what arrives on the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class SSE:
    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Comment:
    text: str


def parse_block(block: str) -> SSE | Comment | None:
    event, data, id_ = "message", [], None
    comment: str | None = None
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            id_ = value
    if not data:
        return Comment(comment) if comment is not None else None
    return SSE(event, "\n".join(data), id_)


async def iter_sse(response: httpx.Response) -> AsyncIterator[SSE | Comment]:
    """Events and comments as they arrive."""
    buf = ""
    async for text in response.aiter_text():
        buf += text.replace("\r\n", "\n")
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            item = parse_block(block)
            if item is not None:
                yield item


_readers: dict[int, AsyncIterator[SSE | Comment]] = {}


async def events(response: httpx.Response, limit: int | None = None) -> list[SSE]:
    """Read events (skipping comments) until the stream ends or `limit` are read; later calls
    on the same response go on where the previous one stopped."""
    it = _readers.get(id(response))
    if it is None:
        it = _readers[id(response)] = iter_sse(response)
    out: list[SSE] = []
    try:
        while limit is None or len(out) < limit:
            item = await anext(it)
            if isinstance(item, SSE):
                out.append(item)
    except StopAsyncIteration:
        _readers.pop(id(response), None)
    return out


async def until_messages(response: httpx.Response, n: int, prefix: str = "messages") -> list[SSE]:
    """Read events until `n` of them are `messages` events (names starting with `prefix`)."""
    head: list[SSE] = []
    while sum(e.event.startswith(prefix) for e in head) < n:
        got = await events(response, limit=1)
        if not got:
            raise AssertionError(f"stream ended after {len(head)} events")
        head += got
    return head
