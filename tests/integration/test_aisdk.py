"""The AI SDK UI message stream adapter over real HTTP (the JS `ai` package is tested in
tests/e2e/test_js_clients.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from langchain_core.messages import HumanMessage

from tests.graphs import FAST_WORDS
from tests.sse import SSE, events
from tokenrelay.api import serving
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


async def test_a_graphs_tool_calls_and_results_are_dynamic_tool_parts(
    client: httpx.AsyncClient,
) -> None:
    # A whole AI message with a tool call, the ToolNode's result, then the streamed answer.
    async with client.stream("POST", "/ai/chat", json=chat_body(str(uuid.uuid4()), "x",
                                                              "tooluse")) as r:  # fmt: skip
        ps = parts(await events(r))
    server = {"dynamic": True, "providerExecuted": True}
    call = {"toolCallId": "call_lookup", "toolName": "lookup"}
    assert ps[1:4] == [
        {"type": "tool-input-start", **call, **server},
        {"type": "tool-input-available", **call, "input": {"query": "streams"}, **server},
        {"type": "tool-output-available", "toolCallId": "call_lookup", "output": "found streams",
         **server},
    ]  # fmt: skip
    assert [p["type"] for p in ps[4:6]] == ["text-start", "text-delta"]
    assert ps[-3:] == [{"type": "text-end", "id": ps[4]["id"]}, {"type": "finish"}, "[DONE]"]

    # A call streamed argument by argument: its input is available once the message is whole,
    # and a resume replays the same parts.
    chat_id = str(uuid.uuid4())
    async with client.stream("POST", "/ai/chat", json=chat_body(chat_id, "x", "tools")) as r:
        head = parts(await events(r, limit=7))
    async with client.stream("GET", f"/ai/chat/{chat_id}/stream") as r:
        ps = parts(await events(r))
    assert ps[: len(head)] == head
    call = {"toolCallId": "call_1", "toolName": "search"}
    calls = [p for p in ps if isinstance(p, dict) and p["type"].startswith("tool-")]
    assert calls[0] == {"type": "tool-input-start", **call, **server}
    deltas = [p["inputTextDelta"] for p in calls if p["type"] == "tool-input-delta"]
    assert "".join(deltas) == '{"query": "resumable streams and more"}'
    assert calls[-1] == {"type": "tool-input-available", **call,
                         "input": {"query": "resumable streams and more"}, **server}  # fmt: skip
    assert text_of(ps) == "Let me look"
    assert [p if isinstance(p, str) else p["type"] for p in ps[-3:]] == [
        "text-end", "finish", "[DONE]"]  # fmt: skip


async def test_reasoning_blocks_are_reasoning_parts(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/ai/chat", json=chat_body(str(uuid.uuid4()), "x",
                                                              "thinking")) as r:  # fmt: skip
        ps = parts(await events(r))
    msg = ps[1]["id"]
    assert ps[1:] == [
        {"type": "reasoning-start", "id": msg},
        {"type": "reasoning-delta", "id": msg, "delta": "The user"},
        {"type": "reasoning-delta", "id": msg, "delta": " wants a word."},
        {"type": "reasoning-end", "id": msg},
        {"type": "text-start", "id": msg},
        {"type": "text-delta", "id": msg, "delta": "Here"},
        {"type": "text-delta", "id": msg, "delta": " it is"},
        {"type": "text-end", "id": msg},
        {"type": "finish"},
        "[DONE]",
    ]


async def test_custom_events_are_data_parts(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/ai/chat", json=chat_body(str(uuid.uuid4()), "x",
                                                              "progress")) as r:  # fmt: skip
        ps = parts(await events(r))
    progress = {"type": "progress", "id": "search", "of": 2}
    assert ps[1:5] == [
        {"type": "data-progress", "id": "search", "data": {**progress, "done": 1}},
        {"type": "data-status", "data": {"type": "status", "text": "reading"}, "transient": True},
        {"type": "data-progress", "id": "search", "data": {**progress, "done": 2}},
        {"type": "data-custom", "data": "plain", "transient": True},
    ]
    assert text_of(ps) == reply_text([HumanMessage("x")], FAST_WORDS)


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


async def test_a_stop_mid_tool_call_ends_the_call_as_stopped(client: httpx.AsyncClient) -> None:
    chat_id = str(uuid.uuid4())
    async with client.stream("POST", "/ai/chat", json=chat_body(chat_id, "hi", "tools")) as r:
        head = parts(await events(r, limit=6))  # start, the text (4 parts), the call's start
        assert head[-1]["type"] == "tool-input-start"
        assert (await client.post(f"/ai/chat/{chat_id}/stop")).json()["stopped"]
        ps = head + parts(await events(r))
    end = [p for p in ps if isinstance(p, dict) and p["type"] == "tool-input-error"]
    assert len(end) == 1 and end[0]["errorText"] == (
        "the run was stopped before the tool call's arguments were complete"
    )
    assert ps.index(end[0]) == len(ps) - 4
    assert [p["type"] for p in ps[-3:-1]] == ["text-end", "abort"]


async def test_bad_chat_requests_are_422(client: httpx.AsyncClient) -> None:
    assert (await client.post("/ai/chat", json={"id": "x", "messages": []})).status_code == 422
    bad = chat_body("x", "hi")
    bad["messages"][0]["role"] = "assistant"
    assert (await client.post("/ai/chat", json=bad)).status_code == 422
    assert (await client.post("/ai/chat", json=chat_body("a{b}", "hi"))).status_code == 422


@pytest.mark.parametrize("refused", [False, True], ids=["taken", "refused"])
async def test_readers_of_a_chat_get_its_parts_exactly_with_batches_written_from_the_fan_out(
    client: httpx.AsyncClient,
    fanout_writes: dict[bool, int],
    monkeypatch: pytest.MonkeyPatch,
    refused: bool,
) -> None:
    """Readers resuming a chat while it streams (`useChat({resume: true})` on several tabs)
    each get the whole reply exactly, the live batches written to them by the fan-out while
    they wait. A batch the connection refuses goes to the reader instead, rendered again from
    the reader's state before the offer (its open text part): with every offer refused, they
    still get the same parts."""
    offers = 0

    def refuse(cycle: Any, chunk: bytes) -> bool:
        nonlocal offers
        offers += 1
        return False

    if refused:
        monkeypatch.setattr(serving, "write_now", refuse)
    chat_id = str(uuid.uuid4())
    async with client.stream("POST", "/ai/chat", json=chat_body(chat_id, "hi", "slow")) as r:
        head = parts(await events(r, limit=4))

        async def resume() -> list[Any]:
            async with client.stream("GET", f"/ai/chat/{chat_id}/stream") as got:
                assert got.status_code == 200
                return parts(await events(got))

        readers = [asyncio.create_task(resume()) for _ in range(6)]
        reference = head + parts(await events(r))
        results = await asyncio.gather(*readers)
    # A token at a time, to 7 readers, for 60 tokens.
    assert (offers if refused else fanout_writes[True]) > 50
    assert text_of(reference).count(" ") + 1 == 60
    types = [p if isinstance(p, str) else p["type"] for p in reference]
    assert types[:2] == ["start", "text-start"]
    assert types[-3:] == ["text-end", "finish", "[DONE]"]
    assert set(types[2:-3]) == {"text-delta"}
    assert all(got == reference for got in results)
