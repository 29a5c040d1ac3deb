"""A worker paused past its lease is superseded: it writes nothing more, its graph stops."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import pytest

from tests.graphs import LONG_WORDS
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


def streamed_reply(evts: list[SSE], mode: str) -> str:
    """The text of the `llm` node's message as `evts` streamed it, in stream mode `mode`."""
    if mode == "messages-tuple":
        return words(evts)
    partials = [e.json()[0] for e in evts if e.event == "messages/partial"]
    return str(partials[-1]["content"])


async def paused_then_cancelled(
    client: httpx.AsyncClient, workers: Any, first: WorkerProcess, tid: str,
    run: dict[str, Any], params: dict[str, Any], *, takeover_first: bool = False,
) -> tuple[str, list[SSE], httpx.Response]:  # fmt: skip
    """Stream `run` on worker `first`, pause it (SIGSTOP) mid-reply, and cancel the run with
    `params` while a second worker takes it over: before that worker starts its attempt, or
    (`takeover_first`) once it has. Returns the run id, what the stream got and the cancel's
    answer; `first` is resumed."""
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run) as r:
        head = await until_messages(r, 8)  # past `plan`, which checkpointed
        run_id = str(head[0].json()["run_id"])
        where = f"/threads/{tid}/runs/{run_id}/cancel"
        first.signal(signal.SIGSTOP)
        try:
            if takeover_first:
                await log_line(workers(), "attempt=2")
                answer = await client.post(where, params=params)
            else:
                cancel = asyncio.create_task(client.post(where, params=params))
                await asyncio.sleep(0.2)  # the cancel is asked for while nobody acts on it
                workers()
                answer = await cancel
        finally:
            first.signal(signal.SIGCONT)
        evts = head + await events(r)
    return run_id, evts, answer


@pytest.mark.parametrize("mode", ["messages-tuple", "messages"])
async def test_a_cancel_the_next_worker_carries_out_keeps_what_the_paused_one_streamed(
    client: httpx.AsyncClient, workers: Any, settings: Settings, mode: str
) -> None:
    # The run's worker is paused mid-reply; the user's cancel reaches a run nobody acts on,
    # and the worker that takes it over finds the cancel before its attempt starts. The
    # partial reply lived in the paused worker's memory and in the run's stream: the stream's
    # copy is what is kept.
    first = workers()
    tid = await new_thread(client)
    run = {**body("twostep"), "stream_mode": [mode, "values"]}
    run_id, evts, answer = await paused_then_cancelled(
        client, workers, first, tid, run, {"wait": 1}
    )
    assert answer.status_code == 200, answer.text

    streamed = streamed_reply(evts, mode)
    assert 0 < len(streamed.split()) < LONG_WORDS
    assert TWOSTEP_REPLY.startswith(streamed)
    state = await thread_state(settings, tid)
    assert [m.type for m in state.values["messages"]] == ["human", "ai", "ai"]
    kept = state.values["messages"][-1]
    assert kept.content == streamed
    assert kept.response_metadata["finish_reason"] == "cancelled"
    # Its clients saw the saved state last, and the run ended interrupted with its fork point.
    assert evts[-1].event == "values"
    assert evts[-1].json()["messages"][-1]["content"] == streamed
    got = (await client.get(f"/threads/{tid}/runs/{run_id}")).json()
    assert got["status"] == "interrupted"
    assert got["attempt"] == 2
    await log_line(first, "nothing more")  # superseded, found at its cancel or its next write
    assert (await thread_state(settings, tid)).values["messages"][-1].content == streamed


async def test_a_rollback_the_next_worker_carries_out_undoes_what_the_paused_one_wrote(
    client: httpx.AsyncClient, workers: Any
) -> None:
    first = workers()
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body("fast")) as r:
        await events(r)
    before = (await client.get(f"/threads/{tid}/state")).json()["values"]
    run_id, _, answer = await paused_then_cancelled(
        client, workers, first, tid, body("twostep"), {"wait": 1, "action": "rollback"}
    )
    assert answer.status_code == 204, answer.text
    assert len(before["messages"]) == 2
    assert (await client.get(f"/threads/{tid}/state")).json()["values"] == before
    assert (await client.get(f"/threads/{tid}/runs/{run_id}")).status_code == 404
    await log_line(first, "nothing more")


async def test_a_cancel_before_the_next_attempt_streams_keeps_what_the_last_one_streamed(
    client: httpx.AsyncClient, workers: Any, settings: Settings
) -> None:
    # The attempt that took the run over is in its graph, thinking before its first token,
    # when the cancel reaches it: what its clients saw last is attempt 1's partial reply.
    first = workers()
    tid = await new_thread(client)
    _, evts, answer = await paused_then_cancelled(
        client, workers, first, tid, body("ponder"), {"wait": 1}, takeover_first=True
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["attempt"] == 2
    assert words(evts, attempt=2) == ""
    streamed = words(evts, attempt=1)
    assert 0 < len(streamed.split()) < LONG_WORDS
    kept = (await thread_state(settings, tid)).values["messages"][-1]
    assert kept.content == streamed
    assert kept.response_metadata["finish_reason"] == "cancelled"
    assert evts[-1].event == "values"
    assert evts[-1].json()["messages"][-1]["content"] == streamed
