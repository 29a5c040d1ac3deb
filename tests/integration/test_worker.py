"""Production worker behaviour: several workers, kill -9 takeover, SIGTERM drain, Postgres."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage

from tests.conftest import RedisServer, make_settings
from tests.graphs import FAST_WORDS, LONG_WORDS
from tests.integration.test_stream import USER, join, new_thread, wait_status
from tests.server import Tokenrelay, WorkerProcess
from tests.sse import SSE, events, until_messages
from tokenrelay.broker.graphs import GraphRegistry, open_checkpointer
from tokenrelay.broker.settings import Settings
from tokenrelay.producer.demo import reply_text

pytestmark = [pytest.mark.timeout(180), pytest.mark.redis("standalone", "cluster")]


TWOSTEP_REPLY = reply_text(
    [HumanMessage(USER["messages"][0]["content"]),
     AIMessage("plan: answer word by word", name="planner")],
    LONG_WORDS,
)  # fmt: skip
"""What the `twostep` graph replies to `USER`, whichever attempt streams it."""


def ran_twice(evts: list[SSE]) -> str:
    """The run id of a stream whose run ran as attempt 1, then as attempt 2, each announced by
    its `metadata` event."""
    run_id = str(evts[0].json()["run_id"])
    assert [e.json() for e in evts if e.event == "metadata"] == [
        {"run_id": run_id, "attempt": 1},
        {"run_id": run_id, "attempt": 2},
    ]
    return run_id


@pytest.fixture
def settings(redis_server: RedisServer, postgres_url: str) -> Settings:
    return make_settings(
        redis_server, checkpointer=postgres_url, lease_seconds=1.5, shutdown_grace_seconds=2.5
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[Tokenrelay]:
    server = Tokenrelay(settings, with_worker=False).start()
    yield server
    server.stop()


@pytest.fixture
async def client(api: Tokenrelay) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as c:
        yield c


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn() -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker{len(started)}.log")
        started.append(w)
        return w.start()

    started_spawn: Any = spawn
    yield started_spawn  # type: ignore[misc]
    for w in started:
        w.stop()


def body(assistant: str, text: str = "tell me about resumable streams") -> dict[str, Any]:
    return {
        "assistant_id": assistant,
        "input": {"messages": [{"role": "user", "content": text}]},
        "stream_mode": ["messages-tuple", "values", "updates"],
    }


def words(evts: list[SSE], attempt: int | None = None) -> str:
    """The text the `llm` node streamed in `evts`, optionally only in one attempt."""
    current, out = 0, []
    for e in evts:
        if e.event == "metadata":
            current = e.json()["attempt"]
        elif e.event == "messages" and (attempt is None or current == attempt):
            chunk, meta = e.json()
            if meta["langgraph_node"] == "llm":
                out.append(chunk["content"])
    return "".join(out)


async def thread_state(settings: Settings, thread_id: str) -> Any:
    async with open_checkpointer(settings.checkpointer) as saver:
        graph = GraphRegistry(settings.graphs, saver).get("twostep")
        return await graph.aget_state({"configurable": {"thread_id": thread_id}})


async def test_two_workers_run_each_of_twenty_runs_once(
    client: httpx.AsyncClient, workers: Any
) -> None:
    workers()
    workers()

    async def one(i: int) -> list[SSE]:
        tid = await new_thread(client)
        async with client.stream(
            "POST", f"/threads/{tid}/runs/stream", json=body("fast", f"question {i}")
        ) as r:
            return await events(r)

    streams = await asyncio.gather(*(one(i) for i in range(20)))
    for i, evts in enumerate(streams):
        assert [e.event for e in evts if e.event == "metadata"] == ["metadata"]
        assert evts[0].json()["attempt"] == 1
        expected = reply_text([HumanMessage(f"question {i}")], FAST_WORDS)
        assert words(evts) == expected
        final = [e for e in evts if e.event == "values"][-1].json()
        assert final["messages"][-1]["content"] == expected
    run_ids = {evts[0].json()["run_id"] for evts in streams}
    assert len(run_ids) == 20


async def test_kill_9_mid_run_another_worker_takes_over_from_the_checkpoint(
    client: httpx.AsyncClient, workers: Any, settings: Settings
) -> None:
    first = workers()
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body("twostep")) as r:
        head = await until_messages(r, 10)
        first.signal(signal.SIGKILL)
        first.wait()
        workers()  # the survivor: it finds the run's lease lapsed and takes it over
        evts = head + await events(r)  # the tailing client gets the rest, and the end

    run_id = ran_twice(evts)
    expected = TWOSTEP_REPLY
    # `plan` ran once, before the kill; attempt 2 continued from the checkpoint after it
    plan_updates = [e for e in evts if e.event == "updates" and "plan" in e.json()]
    assert len(plan_updates) == 1
    assert words(evts, attempt=2) == expected
    assert expected.startswith(words(evts, attempt=1))
    run = (await client.get(f"/threads/{tid}/runs/{run_id}")).json()
    assert run["status"] == "success"
    assert run["attempt"] == 2
    state = await thread_state(settings, tid)
    assert [m.type for m in state.values["messages"]] == ["human", "ai", "ai"]
    assert state.values["messages"][-1].content == expected
    # a late reader also gets the whole stream and its end
    assert [e.id for e in await join(client, tid, run_id, "-1")] == [e.id for e in evts]


@pytest.mark.redis("standalone")  # attempt counting; takeover runs on both
async def test_past_max_attempts_the_run_ends_with_an_error(
    client: httpx.AsyncClient, workers: Any, settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"max_attempts": 1})
    w = WorkerProcess(s, tmp_path / "one-attempt.log").start()
    tid = await new_thread(client)
    try:
        async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body("twostep")) as r:
            head = await events(r, limit=4)
            w.signal(signal.SIGKILL)
            w.wait()
            w2 = WorkerProcess(s, tmp_path / "second.log").start()
            evts = head + await events(r)
    finally:
        w.stop()
    w2.stop()
    assert evts[-1].event == "error"
    assert evts[-1].json()["error"] == "RunAttemptsExhausted"
    run_id = evts[0].json()["run_id"]
    assert (await client.get(f"/threads/{tid}/runs/{run_id}")).json()["status"] == "error"


@pytest.mark.redis("standalone")  # drain timing, the same on any Redis
async def test_sigterm_drains_short_runs_and_hands_back_long_ones(
    client: httpx.AsyncClient, workers: Any, settings: Settings
) -> None:
    first = workers()
    short_tid, long_tid = await new_thread(client), await new_thread(client)
    async with (
        client.stream("POST", f"/threads/{short_tid}/runs/stream", json=body("slow")) as short,
        client.stream("POST", f"/threads/{long_tid}/runs/stream", json=body("twostep")) as long,
    ):
        short_head = await events(short, limit=3)
        long_head = await events(long, limit=3)
        first.signal(signal.SIGTERM)
        short_evts = short_head + await events(short)  # finishes within the grace period
        assert first.wait(timeout=20) == 0  # the long one was handed back, then it exited
        workers()
        long_evts = long_head + await events(long)

    short_run = short_evts[0].json()["run_id"]
    assert [e.json()["attempt"] for e in short_evts if e.event == "metadata"] == [1]
    run = (await client.get(f"/threads/{short_tid}/runs/{short_run}")).json()
    assert run["status"] == "success"
    assert run["attempt"] == 1

    long_run = long_evts[0].json()["run_id"]
    assert [e.json()["attempt"] for e in long_evts if e.event == "metadata"] == [1, 2]
    run = (await client.get(f"/threads/{long_tid}/runs/{long_run}")).json()
    assert run["status"] == "success"
    assert "run handed back to the queue" in first.log_path.read_text()
    state = await thread_state(settings, long_tid)
    assert len(state.values["messages"]) == 3


@pytest.mark.redis("standalone")  # about the Postgres checkpointer
async def test_postgres_state_survives_a_worker_restart(
    client: httpx.AsyncClient, workers: Any, settings: Settings
) -> None:
    first = workers()
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=body("fast")) as r:
        await events(r)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    workers()
    follow_up = body("fast", "and then?")
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=follow_up) as r:
        evts = await events(r)
    final = [e for e in evts if e.event == "values"][-1].json()
    assert [m["type"] for m in final["messages"]] == ["human", "ai", "human", "ai"]
    assert final["messages"][2]["content"] == "and then?"


async def test_a_bad_job_fails_alone_and_the_worker_goes_on(
    client: httpx.AsyncClient, workers: Any
) -> None:
    worker = workers()
    bad_tid, good_tid = await new_thread(client), await new_thread(client)
    bad = body("fast")
    bad["input"] = {"messages": [{"role": "alien", "content": "hi"}]}
    async with client.stream("POST", f"/threads/{bad_tid}/runs/stream", json=bad) as r:
        bad_evts = await events(r)
    assert bad_evts[-1].event == "error"
    # The worker's log says what failed, at ERROR, as the error event does.
    error = bad_evts[-1].json()
    logged = worker.log_path.read_text()
    assert logged.count("run failed") == 1
    assert f" ERROR tokenrelay.worker run failed: {error['error']}: {error['message']}" in logged
    async with client.stream("POST", f"/threads/{good_tid}/runs/stream", json=body("fast")) as r:
        good_evts = await events(r)
    run_id = good_evts[0].json()["run_id"]
    await wait_status(client, good_tid, run_id, "success")
