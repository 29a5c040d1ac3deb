"""Streaming a run over real HTTP and resuming it with Last-Event-ID."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from langchain_core.messages import HumanMessage

from tests.conftest import RedisServer, live_subscribers, make_settings
from tests.graphs import FAST_WORDS
from tests.server import Tokenrelay
from tests.sse import SSE, Comment, events, iter_sse
from tokenrelay.broker.connection import connect
from tokenrelay.broker.keys import Keys
from tokenrelay.broker.models import RunStatus, StreamId
from tokenrelay.broker.queue import RunQueue
from tokenrelay.broker.runs import RunRecord, RunStore, new_id, now_ms
from tokenrelay.producer.demo import reply_text

pytestmark = pytest.mark.redis("standalone", "cluster")

USER = {"messages": [{"role": "user", "content": "tell me about resumable streams"}]}
MODES = ["messages-tuple", "values", "updates"]


def run_body(assistant: str = "fast", **extra: Any) -> dict[str, Any]:
    return {"assistant_id": assistant, "input": USER, "stream_mode": MODES, **extra}


async def new_thread(client: httpx.AsyncClient) -> str:
    r = await client.post("/threads", json={})
    assert r.status_code == 200
    return str(r.json()["thread_id"])


async def stream_run(
    client: httpx.AsyncClient, thread_id: str, body: dict[str, Any], limit: int | None = None
) -> tuple[list[SSE], httpx.Headers]:
    async with client.stream("POST", f"/threads/{thread_id}/runs/stream", json=body) as r:
        assert r.status_code == 200, await r.aread()
        return await events(r, limit), r.headers


async def join(
    client: httpx.AsyncClient, thread_id: str, run_id: str, last_event_id: str | None = None,
    *, via_query: bool = False,
) -> list[SSE]:  # fmt: skip
    headers, params = {}, {}
    if last_event_id is not None:
        if via_query:
            params["last_event_id"] = last_event_id
        else:
            headers["Last-Event-ID"] = last_event_id
    url = f"/threads/{thread_id}/runs/{run_id}/stream"
    async with client.stream("GET", url, headers=headers, params=params) as r:
        assert r.status_code == 200, await r.aread()
        return await events(r)


def message_text(evts: list[SSE]) -> str:
    return "".join(e.json()[0]["content"] for e in evts if e.event == "messages")


def expected_text() -> str:
    return reply_text([HumanMessage(USER["messages"][0]["content"])], FAST_WORDS)


async def wait_status(client: httpx.AsyncClient, tid: str, rid: str, status: str) -> None:
    for _ in range(200):
        r = await client.get(f"/threads/{tid}/runs/{rid}")
        if r.json()["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {rid} never reached {status}: {r.json()}")


async def test_events_in_order_with_increasing_ids_and_full_text(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    evts, headers = await stream_run(client, tid, run_body())

    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-store"
    assert headers["x-accel-buffering"] == "no"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    run_id = evts[0].json()["run_id"]
    assert headers["location"] == f"/threads/{tid}/runs/{run_id}/stream"
    assert headers["content-location"] == f"/threads/{tid}/runs/{run_id}"

    assert evts[0].event == "metadata"
    assert evts[0].json() == {"run_id": run_id, "attempt": 1}
    ids = [StreamId.parse(e.id or "") for e in evts]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert message_text(evts) == expected_text()
    # messages-tuple: [chunk, metadata] with the node that streamed it
    chunk, meta = next(e for e in evts if e.event == "messages").json()
    assert chunk["type"] == "AIMessageChunk"
    assert meta["langgraph_node"] == "llm" and meta["run_id"] == run_id
    final = [e for e in evts if e.event == "values"][-1].json()
    assert [m["type"] for m in final["messages"]] == ["human", "ai"]
    assert final["messages"][1]["content"] == expected_text()
    assert {e.event for e in evts} == {"metadata", "values", "messages", "updates"}

    run = (await client.get(f"/threads/{tid}/runs/{run_id}")).json()
    assert run["status"] == "success"
    assert run["thread_id"] == tid and run["assistant_id"] == "fast"
    assert (await client.get(f"/threads/{tid}")).json()["status"] == "idle"


@pytest.mark.parametrize("k", [1, 2, 30, 60])
async def test_resume_after_disconnect_gets_exactly_the_rest(
    client: httpx.AsyncClient, k: int
) -> None:
    tid = await new_thread(client)
    # The creator stays connected: its events are the reference sequence.
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        first = await events(r, limit=1)
        run_id = first[0].json()["run_id"]
        # A second client drops after k events while the run goes on, then resumes.
        url = f"/threads/{tid}/runs/{run_id}/stream"
        async with client.stream("GET", url, headers={"Last-Event-ID": "-1"}) as j:
            head = await events(j, limit=k)
        rest = await join(client, tid, run_id, head[-1].id)
        full = first + await events(r)
    whole = head + rest
    assert [(e.id, e.event, e.data) for e in whole] == [(e.id, e.event, e.data) for e in full]
    assert message_text(whole).count(" ") + 1 == 60


async def test_resume_after_run_finished(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    full, _ = await stream_run(client, tid, run_body())
    run_id = full[0].json()["run_id"]
    for k in (1, len(full) // 3, len(full) - 1, len(full)):
        rest = await join(client, tid, run_id, full[k - 1].id)
        assert [e.id for e in rest] == [e.id for e in full[k:]]
        assert [e.data for e in rest] == [e.data for e in full[k:]]
    # the query parameter works like the header; -1 and 0 replay everything
    rest = await join(client, tid, run_id, full[4].id, via_query=True)
    assert [e.id for e in rest] == [e.id for e in full[5:]]
    for start in ("-1", "0"):
        assert [e.id for e in await join(client, tid, run_id, start)] == [e.id for e in full]
    # no Last-Event-ID on a finished run: nothing new will come, so it closes at once
    assert await join(client, tid, run_id) == []


async def test_a_cursor_past_the_end_of_a_finished_run_is_refused_at_once(
    redis_server: RedisServer,
) -> None:
    # Heartbeats 10 minutes apart: a response held open until the next idle check would make
    # the client below time out instead of answering.
    s = make_settings(redis_server, heartbeat_seconds=600)
    server = Tokenrelay(s).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            tid = await new_thread(client)
            full, _ = await stream_run(client, tid, run_body())
            run_id, last = full[0].json()["run_id"], full[-1].id
            assert last is not None
            past = f"{int(last.split('-')[0]) + 3_600_000}-0"  # an hour after the run's end
            url = f"/threads/{tid}/runs/{run_id}/stream"
            detail = (
                f"Last-Event-ID {past} is past the end of run {run_id}, which has finished: its "
                f"last event id is {last} (or send -1 to replay from the start)"
            )
            for r in (
                await client.get(url, headers={"Last-Event-ID": past}),
                await client.get(url, params={"last_event_id": past}),
            ):
                assert (r.status_code, r.json()) == (400, {"detail": detail})

            # The cursor the long poll ends on (the run's internal end marker) is not past the
            # end: nothing follows it, and the stream says so at once.
            poll = (await client.get(f"/threads/{tid}/runs/{run_id}/events", params={
                "after": last})).json()  # fmt: skip
            assert poll["events"] == [] and poll["done"] is True
            assert StreamId.parse(poll["next"]) > StreamId.parse(last)
            async with client.stream("GET", url, headers={"Last-Event-ID": poll["next"]}) as r:
                assert (r.status_code, await r.aread()) == (200, b"")

            # A thread join that finds a finished run still named active (a join that raced the
            # run's end) answers as for an idle thread.
            redis = connect(s.resolved_redis_url())
            active = Keys(s.key_prefix).thread_active(tid)
            await redis.set(active, run_id)
            r = await client.get(f"/threads/{tid}/stream", headers={"Last-Event-ID": past})
            assert r.status_code == 204
            await redis.aclose()
    finally:
        server.stop()


async def test_two_clients_on_one_run_both_get_every_event(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        it = events(r, limit=2)
        first = await it
        run_id = first[0].json()["run_id"]
        second_task = asyncio.create_task(join(client, tid, run_id, "-1"))
        rest = await events(r)
    creator = first + rest
    joiner = await second_task
    assert [(e.id, e.event, e.data) for e in joiner] == [(e.id, e.event, e.data) for e in creator]
    assert message_text(creator).count(" ") + 1 == 60


async def test_join_without_last_event_id_streams_from_now(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=5)
        run_id = head[0].json()["run_id"]
        live = await join(client, tid, run_id)
        rest = await events(r)
    assert live, "a live join of a running run gets the events still to come"
    tail_ids = [e.id for e in rest]
    assert [e.id for e in live] == tail_ids[len(tail_ids) - len(live) :]


async def test_disconnect_does_not_stop_the_run(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=3)
    run_id = head[0].json()["run_id"]
    assert (await client.get(f"/threads/{tid}")).json()["status"] == "busy"
    await wait_status(client, tid, run_id, "success")
    full = await join(client, tid, run_id, "-1")
    assert message_text(full).count(" ") + 1 == 60


async def test_graph_that_raises_ends_with_error_event(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    evts, _ = await stream_run(client, tid, run_body("failing"))
    assert evts[-1].event == "error"
    assert evts[-1].json() == {"error": "Boom", "message": "the model caught fire"}
    assert message_text(evts) == expected_text()  # what streamed before the failure is kept
    run_id = evts[0].json()["run_id"]
    run = (await client.get(f"/threads/{tid}/runs/{run_id}")).json()
    assert run["status"] == "error"
    assert (await client.get(f"/threads/{tid}")).json()["status"] == "error"
    # a late joiner gets the same ending and does not hang
    again = await join(client, tid, run_id, "-1")
    assert [e.id for e in again] == [e.id for e in evts]


async def test_invalid_input_ends_the_run_with_an_error(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    body = run_body(input={"messages": [{"role": "alien", "content": "hi"}]})
    evts, _ = await stream_run(client, tid, body)
    assert [e.event for e in evts] == ["metadata", "error"]
    assert evts[-1].json()["error"] == "ValueError"
    run_id = evts[0].json()["run_id"]
    assert (await client.get(f"/threads/{tid}/runs/{run_id}")).json()["status"] == "error"


async def test_job_for_an_unknown_assistant_ends_with_error(
    client: httpx.AsyncClient, relay: Tokenrelay
) -> None:
    # The API validates assistants, so only a job queued by another deployment can name one this
    # worker lacks; the run must still end with an error event instead of leaving readers hanging.
    tid = await new_thread(client)
    s = relay.settings
    redis = connect(s.resolved_redis_url())
    keys = Keys(s.key_prefix)
    ts = now_ms()
    run = RunRecord(new_id(), tid, "ghost", RunStatus.PENDING, ts, ts)
    await RunQueue(redis, keys).enqueue(await RunStore(redis, keys, ttl_seconds=60).create(run))
    await redis.aclose()
    evts = await join(client, tid, run.run_id, "-1")
    assert [e.event for e in evts] == ["metadata", "error"]
    assert evts[-1].json() == {
        "error": "AssistantNotFound",
        "message": "Assistant with ID ghost not found",
    }
    assert (await client.get(f"/threads/{tid}/runs/{run.run_id}")).json()["status"] == "error"


@pytest.mark.redis("standalone")  # HTTP heartbeats
async def test_idle_stream_sends_heartbeats(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    seen: list[str] = []
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("quiet")) as r:
        async for item in iter_sse(r):
            seen.append("heartbeat" if isinstance(item, Comment) else item.event)
    assert seen[:2] == ["metadata", "values"]
    first_message = seen.index("messages")
    assert seen[2:first_message].count("heartbeat") >= 2
    assert seen[-1] == "values"


async def test_disconnected_clients_release_the_live_subscription(
    client: httpx.AsyncClient, relay: Tokenrelay
) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=2)
    run_id = head[0].json()["run_id"]
    redis = connect(relay.settings.resolved_redis_url())
    channel = Keys(relay.settings.key_prefix).live(run_id)
    try:
        for _ in range(100):  # the server notices at its next write, at most one heartbeat later
            subscribers = await live_subscribers(redis, channel)
            if subscribers == 0:
                break
            await asyncio.sleep(0.05)
        assert subscribers == 0
    finally:
        await redis.aclose()


@pytest.mark.redis("standalone")  # Prometheus counters
async def test_worker_metrics_count_runs_and_events(client: httpx.AsyncClient) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    before = (
        value("tokenrelay_runs_finished_total", {"status": "success"}),
        value("tokenrelay_events_published_total"),
    )
    tid = await new_thread(client)
    evts, _ = await stream_run(client, tid, run_body())
    for _ in range(100):  # the worker counts the run just after it writes the end
        after = (
            value("tokenrelay_runs_finished_total", {"status": "success"}),
            value("tokenrelay_events_published_total"),
        )
        if after[0] > before[0]:
            break
        await asyncio.sleep(0.02)
    assert after[0] - before[0] >= 1
    assert after[1] - before[1] >= len(evts) + 1  # every event plus the `end` marker
