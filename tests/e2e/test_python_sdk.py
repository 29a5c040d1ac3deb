"""The real Python client, `langgraph-sdk`, pointed at tokenrelay unchanged."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest
from langchain_core.messages import HumanMessage
from langgraph_sdk import get_client

from tests.graphs import FAST_WORDS
from tests.server import Tokenrelay
from tokenrelay.producer.demo import reply_text


def say(text: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": text}]}


async def test_threads_runs_state_and_history(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    thread = await client.threads.create(metadata={"owner": "sdk"})
    tid = thread["thread_id"]
    assert thread["status"] == "idle"

    parts = [
        p
        async for p in client.runs.stream(
            tid, "fast", input=say("hi"), stream_mode=["values", "messages-tuple", "updates"],
            stream_resumable=True, on_disconnect="continue",
        )
    ]  # fmt: skip
    assert parts[0].event == "metadata"
    text = "".join(p.data[0]["content"] for p in parts if p.event == "messages")
    assert text == reply_text([HumanMessage("hi")], FAST_WORDS)

    state = await client.threads.get_state(tid)
    assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai"]
    assert state["next"] == []
    assert state["checkpoint"]["thread_id"] == tid
    history = await client.threads.get_history(tid)
    assert history[0]["checkpoint"]["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert len(history) >= 3

    waited = await client.runs.wait(tid, "fast", input=say("again"))
    assert [m["type"] for m in waited["messages"]] == ["human", "ai", "human", "ai"]

    run = await client.runs.create(tid, "fast", input=say("third"))
    assert run["status"] == "pending"
    joined = await client.runs.join(tid, run["run_id"])
    assert len(joined["messages"]) == 6
    assert (await client.runs.get(tid, run["run_id"]))["status"] == "success"
    assert [r["status"] for r in await client.runs.list(tid)] == ["success"] * 3

    got = await client.threads.get(tid)
    assert got["status"] == "idle"
    assert got["metadata"]["owner"] == "sdk"
    assert len(got["values"]["messages"]) == 6
    found = await client.threads.search(metadata={"owner": "sdk"})
    assert [t["thread_id"] for t in found] == [tid]

    update = await client.threads.update_state(tid, {"messages": [say("x")["messages"][0]]})
    assert update["checkpoint"]["checkpoint_id"] != state["checkpoint"]["checkpoint_id"]
    assert len((await client.threads.get_state(tid))["values"]["messages"]) == 7


async def test_join_stream_after_a_dropped_connection(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    tid = (await client.threads.create())["thread_id"]
    seen = []
    async for part in client.runs.stream(
        tid, "slow", input=say("resume me"), stream_mode=["messages-tuple", "values"],
        stream_resumable=True,
    ):  # fmt: skip
        seen.append(part)
        if len(seen) == 10:
            break  # the connection drops; the run goes on
    run_id = seen[0].data["run_id"]
    rest = [p async for p in client.runs.join_stream(tid, run_id, last_event_id=seen[-1].id)]
    everything = [p async for p in client.runs.join_stream(tid, run_id, last_event_id="-1")]
    assert [p.id for p in seen + rest] == [p.id for p in everything]
    text = "".join(p.data[0]["content"] for p in seen + rest if p.event == "messages")
    assert text.count(" ") + 1 == 60


async def test_thread_join_stream(relay: Tokenrelay) -> None:
    """`threads.join_stream` joins the thread's active run, and finds nothing, without an
    error, when none is."""
    client = get_client(url=relay.url)
    tid = (await client.threads.create())["thread_id"]
    assert [p async for p in await client.threads.join_stream(tid)] == []
    run = await client.runs.create(
        tid, "slow", input=say("join the thread"), stream_mode=["values", "messages-tuple"]
    )
    joined = [p async for p in await client.threads.join_stream(tid, last_event_id="-1")]
    assert joined[0].event == "metadata" and joined[0].data["run_id"] == run["run_id"]
    text = "".join(p.data[0]["content"] for p in joined if p.event == "messages")
    assert text.count(" ") + 1 == 60
    again = client.runs.join_stream(tid, run["run_id"], last_event_id="-1")
    assert [p.id async for p in again] == [p.id for p in joined]
    assert [p async for p in await client.threads.join_stream(tid)] == []


async def test_wait_raises_the_run_error_and_join_returns_it(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    tid = (await client.threads.create())["thread_id"]
    with pytest.raises(Exception, match="Boom: the model caught fire"):
        await client.runs.wait(tid, "failing", input=say("x"))
    run = (await client.runs.list(tid))[0]
    assert run["status"] == "error"
    joined = await client.runs.join(tid, run["run_id"])
    assert joined == {"__error__": {"error": "Boom", "message": "the model caught fire"}}
    assert (await client.threads.get(tid))["status"] == "error"


async def test_stateless_runs_and_assistants(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    parts = [p async for p in client.runs.stream(None, "fast", input=say("no thread"))]
    assert [p.event for p in parts] == ["metadata", "values", "values"]
    waited = await client.runs.wait(None, "fast", input=say("no thread"))
    assert len(waited["messages"]) == 2
    assistants = await client.assistants.search(graph_id="fast")
    assert [a["graph_id"] for a in assistants] == ["fast"]
    by_uuid = await client.assistants.get(assistants[0]["assistant_id"])
    assert by_uuid["graph_id"] == "fast"
    graph = await client.assistants.get_graph("fast")
    assert [n["id"] for n in graph["nodes"]] == ["__start__", "llm", "__end__"]
    # a run addressed by the assistant's uuid
    parts = [
        p async for p in client.runs.stream(None, assistants[0]["assistant_id"], input=say("u"))
    ]
    assert parts[-1].event == "values"


async def test_a_stateless_run_keeps_its_thread_when_asked(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    kept = await client.runs.create(None, "fast", input=say("keep me"), on_completion="keep")
    await client.runs.join(kept["thread_id"], kept["run_id"])
    thread = await client.threads.get(kept["thread_id"])
    assert "stateless" not in thread["metadata"]
    state = await client.threads.get_state(kept["thread_id"])
    assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai"]
    # the thread is an ordinary one: it takes another run
    await client.runs.wait(kept["thread_id"], "fast", input=say("again"))
    state = await client.threads.get_state(kept["thread_id"])
    assert len(state["values"]["messages"]) == 4
    with pytest.raises(httpx.HTTPStatusError) as exc:
        await client.runs.create(None, "fast", input=say("x"), on_completion="archive")  # type: ignore[arg-type]
    assert exc.value.response.status_code == 422
    assert "on_completion" in exc.value.response.text


async def test_a_run_put_off_starts_when_due_and_can_be_cancelled_before(
    relay: Tokenrelay,
) -> None:
    client = get_client(url=relay.url)
    tid = (await client.threads.create())["thread_id"]
    run = await client.runs.create(tid, "fast", input=say("later"), after_seconds=1.5)
    assert run["status"] == "pending"
    assert run["kwargs"]["after_seconds"] == 1.5
    await client.runs.join(tid, run["run_id"])
    assert (await client.runs.get(tid, run["run_id"]))["status"] == "success"
    # Nothing of the run was written before its time: the checkpoint its graph wrote says when.
    state = await client.threads.get_state(tid)
    assert state["created_at"] is not None
    ran_at = datetime.fromisoformat(state["created_at"])
    assert (ran_at - datetime.fromisoformat(run["created_at"])).total_seconds() >= 1.5
    # A run cancelled while it waits ends at once and frees its thread for the next run.
    later = await client.runs.create(tid, "fast", input=say("never"), after_seconds=300)
    await client.runs.cancel(tid, later["run_id"], wait=True)
    assert (await client.runs.get(tid, later["run_id"]))["status"] == "interrupted"
    waited = await client.runs.wait(tid, "fast", input=say("now"))
    assert waited["messages"][-2]["content"] == "now"
    with pytest.raises(httpx.HTTPStatusError) as exc:
        await client.runs.create(tid, "fast", input=say("x"), after_seconds=-1)
    assert exc.value.response.status_code == 422
    assert "after_seconds" in exc.value.response.text


async def test_errors_come_back_as_sdk_exceptions(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    with pytest.raises(httpx.HTTPStatusError) as exc:
        await client.threads.get("missing")
    assert exc.value.response.status_code == 404
    with pytest.raises(httpx.HTTPStatusError) as exc:
        await client.assistants.get("ghost")
    assert exc.value.response.status_code == 404


async def test_events_stream_mode(relay: Tokenrelay) -> None:
    """`stream_mode="events"`: LangChain's event stream, beside the other modes, resumable,
    and a cancel still keeps the partial reply."""
    client = get_client(url=relay.url)
    tid = (await client.threads.create())["thread_id"]
    parts = [p async for p in client.runs.stream(
        tid, "fast", input=say("hi"), stream_mode=["events", "values"])]  # fmt: skip
    assert {p.event for p in parts} == {"metadata", "events", "values"}
    evs = [p.data for p in parts if p.event == "events"]
    assert evs[0]["event"] == "on_chain_start" and evs[-1]["event"] == "on_chain_end"
    tokens = [e["data"]["chunk"]["content"] for e in evs if e["event"] == "on_chat_model_stream"]
    assert "".join(tokens) == reply_text([HumanMessage("hi")], FAST_WORDS)
    values = [p.data for p in parts if p.event == "values"]
    assert values[-1]["messages"][-1]["content"] == "".join(tokens)
    run_id = parts[0].data["run_id"]
    joined = [p async for p in client.runs.join_stream(
        tid, run_id, last_event_id="-1", stream_mode="events")]  # fmt: skip
    assert [p.data for p in joined if p.event == "events"] == evs

    seen = []
    async for part in client.runs.stream(tid, "slow", input=say("stop"), stream_mode="events"):
        seen.append(part)
        if sum(p.event == "events" and p.data["event"] == "on_chat_model_stream"
               for p in seen) == 8:  # fmt: skip
            break
    await client.runs.cancel(tid, seen[0].data["run_id"], wait=True, action="interrupt")
    partial = (await client.threads.get_state(tid))["values"]["messages"][-1]
    assert partial["response_metadata"]["finish_reason"] == "cancelled"
    assert 8 <= len(partial["content"].split()) < 60


async def test_cancel_keeps_the_partial_and_multitask_strategies(relay: Tokenrelay) -> None:
    client = get_client(url=relay.url)
    tid = (await client.threads.create())["thread_id"]
    seen = []
    async for part in client.runs.stream(
        tid, "slow", input=say("stop me"), stream_mode=["messages-tuple"], stream_resumable=True
    ):
        seen.append(part)
        if sum(p.event == "messages" for p in seen) == 8:
            break
    run_id = seen[0].data["run_id"]
    await client.runs.cancel(tid, run_id, wait=True, action="interrupt")
    run = await client.runs.get(tid, run_id)
    assert run["status"] == "interrupted"
    state = await client.threads.get_state(tid)
    partial = state["values"]["messages"][-1]
    assert partial["response_metadata"]["finish_reason"] == "cancelled"
    assert 8 <= len(partial["content"].split()) < 60

    # reject while busy, then enqueue in order
    first = await client.runs.create(tid, "slow", input=say("one"))
    with pytest.raises(httpx.HTTPStatusError) as exc:
        await client.runs.create(tid, "fast", input=say("two"), multitask_strategy="reject")
    assert exc.value.response.status_code == 409
    second = await client.runs.create(tid, "fast", input=say("two"), multitask_strategy="enqueue")
    await client.runs.join(tid, second["run_id"])
    assert (await client.runs.get(tid, first["run_id"]))["status"] == "success"
    # interrupt: the active run stops (keeping its partial) and the new one runs after it
    third = await client.runs.create(tid, "slow", input=say("three"))
    fourth = await client.runs.create(
        tid, "fast", input=say("four"), multitask_strategy="interrupt"
    )
    await client.runs.join(tid, fourth["run_id"])
    assert (await client.runs.get(tid, third["run_id"]))["status"] == "interrupted"
    # rollback: the active run is undone and deleted
    before_fifth = await client.threads.get_state(tid)
    fifth = await client.runs.create(tid, "slow", input=say("five"))
    sixth = await client.runs.create(tid, "fast", input=say("six"), multitask_strategy="rollback")
    await client.runs.join(tid, sixth["run_id"])
    with pytest.raises(httpx.HTTPStatusError):
        await client.runs.get(tid, fifth["run_id"])
    messages = (await client.threads.get_state(tid))["values"]["messages"]
    assert len(messages) == len(before_fifth["values"]["messages"]) + 2
    assert messages[-2]["content"] == "six"
