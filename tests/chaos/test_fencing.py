"""A worker paused past its lease is superseded: it writes nothing more, its graph stops."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import pytest

from tests.integration.test_stream import new_thread
from tests.integration.test_worker import TWOSTEP_REPLY, body, ran_twice, thread_state, words
from tests.server import WorkerProcess
from tests.sse import SSE, events, until_messages
from tokenrelay.broker.settings import Settings

pytestmark = [pytest.mark.timeout(120), pytest.mark.redis("standalone", "cluster")]


async def log_line(worker: WorkerProcess, text: str) -> str:
    """Wait until `worker`'s log has a line containing `text`; returns it."""
    while True:
        for line in worker.log_path.read_text().splitlines():
            if text in line:
                return line
        await asyncio.sleep(0.05)


def streamed_message_id(evts: list[SSE], attempt: int) -> str:
    current = 0
    for e in evts:
        if e.event == "metadata":
            current = e.json()["attempt"]
        elif e.event == "messages" and current == attempt:
            chunk, meta = e.json()
            if meta["langgraph_node"] == "llm":
                return str(chunk["id"])
    raise AssertionError(f"attempt {attempt} streamed no message")


async def test_a_worker_paused_past_its_lease_writes_nothing_more(
    client: httpx.AsyncClient, workers: Any, settings: Settings
) -> None:
    first = workers()
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body("twostep")) as r:
        head = await until_messages(r, 5)
        first.signal(signal.SIGSTOP)
        try:
            second = workers()  # takes the run over once the paused worker's lease lapses
            while not any(e.event == "metadata" and e.json()["attempt"] == 2 for e in head):
                head += await events(r, limit=1)
            head += await until_messages(r, 3)  # attempt 2 is streaming
        finally:
            first.signal(signal.SIGCONT)
        # The first worker wakes up mid-node: its next write or lease renewal finds it
        # superseded, and it stops its graph.
        await log_line(first, "stopping attempt 1, writing nothing more")
        evts = head + await events(r)

    run_id = ran_twice(evts)
    expected = TWOSTEP_REPLY
    # After attempt 2 began, every token is attempt 2's: attempt 1 appended nothing more.
    assert words(evts, attempt=2) == expected
    assert evts[-1].event == "values"
    await log_line(second, "run finished: success")
    run = (await client.get(f"/threads/{tid}/runs/{run_id}")).json()
    assert run["status"] == "success" and run["attempt"] == 2
    assert "run finished" not in first.log_path.read_text()

    # The thread holds attempt 2's reply, checkpointed once.
    state = await thread_state(settings, tid)
    assert [m.type for m in state.values["messages"]] == ["human", "ai", "ai"]
    assert state.values["messages"][-1].content == expected
    assert state.values["messages"][-1].id == streamed_message_id(evts, 2)
    history = (await client.post(f"/threads/{tid}/history", json={"limit": 100})).json()
    ai_checkpoints = [
        h for h in history if (h["metadata"].get("writes") or {}).get("llm") is not None
    ]
    if not ai_checkpoints:  # newer LangGraph does not record writes: count AI messages instead
        counts = [sum(m["type"] == "ai" for m in h["values"]["messages"]) for h in history]
        ai_checkpoints = [h for h, n in zip(history, counts, strict=True) if n == 2]
    assert len(ai_checkpoints) == 1
    # The thread is free: the next run starts at once.
    follow = await client.post(f"/threads/{tid}/runs", json=body("fast"))
    assert follow.status_code == 200
