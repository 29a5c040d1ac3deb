"""The AI SDK UI message stream adapter over real HTTP (the JS `ai` package is tested in
tests/e2e/test_js_clients.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from langchain_core.messages import HumanMessage

from tests.graphs import FAST_WORDS
from tests.sse import SSE, events
from tokenrelay.producer.demo import reply_text


def chat_body(chat_id: str, text: str, assistant: str = "fast") -> dict[str, Any]:
    return {
        "id": chat_id,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
        "trigger": "submit-message",
        "assistant_id": assistant,
    }


def parts(evts: list[SSE]) -> list[Any]:
    return [json.loads(e.data) if e.data != "[DONE]" else "[DONE]" for e in evts]


def text_of(ps: list[Any]) -> str:
    return "".join(p["delta"] for p in ps if isinstance(p, dict) and p["type"] == "text-delta")


async def test_chat_streams_ui_message_parts(client: httpx.AsyncClient) -> None:
    chat_id = str(uuid.uuid4())
    async with client.stream("POST", "/ai/chat", json=chat_body(chat_id, "hello")) as r:
        assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert r.headers["content-type"].startswith("text/event-stream")
        ps = parts(await events(r))
    types = [p if isinstance(p, str) else p["type"] for p in ps]
    assert types[0] == "start"
    assert types[1] == "text-start"
    assert types[-3:] == ["text-end", "finish", "[DONE]"]
    assert set(types[2:-3]) == {"text-delta"}
    assert text_of(ps) == reply_text([HumanMessage("hello")], FAST_WORDS)
    assert (await client.get(f"/ai/chat/{chat_id}/stream")).status_code == 204
    state = (await client.get(f"/threads/{chat_id}/state")).json()
    assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai"]


async def test_resume_replays_from_start_and_goes_live(client: httpx.AsyncClient) -> None:
    chat_id = str(uuid.uuid4())
    async with client.stream("POST", "/ai/chat", json=chat_body(chat_id, "hi", "slow")) as r:
        head = parts(await events(r, limit=5))
    async with client.stream("GET", f"/ai/chat/{chat_id}/stream") as r:
        assert r.status_code == 200
        resumed = parts(await events(r))
    assert resumed[: len(head)] == head
    assert resumed[-1] == "[DONE]"
    assert text_of(resumed).count(" ") + 1 == 60


async def test_stop_keeps_the_partial_text(client: httpx.AsyncClient) -> None:
    chat_id = str(uuid.uuid4())
    async with client.stream("POST", "/ai/chat", json=chat_body(chat_id, "hi", "slow")) as r:
        head = parts(await events(r, limit=8))
        stopped = (await client.post(f"/ai/chat/{chat_id}/stop")).json()
        assert stopped["stopped"]
        rest = parts(await events(r))
    ps = head + rest
    assert [p["type"] for p in ps[-3:-1]] == ["text-end", "abort"]
    partial = (await client.get(f"/threads/{chat_id}/state")).json()["values"]["messages"][-1]
    assert partial["content"] == text_of(ps)
    assert 0 < len(text_of(ps).split()) < 60
    assert (await client.post(f"/ai/chat/{chat_id}/stop")).json() == {"stopped": None}


async def test_bad_chat_requests_are_422(client: httpx.AsyncClient) -> None:
    assert (await client.post("/ai/chat", json={"id": "x", "messages": []})).status_code == 422
    bad = chat_body("x", "hi")
    bad["messages"][0]["role"] = "assistant"
    assert (await client.post("/ai/chat", json=bad)).status_code == 422
    assert (await client.post("/ai/chat", json=chat_body("a{b}", "hi"))).status_code == 422
