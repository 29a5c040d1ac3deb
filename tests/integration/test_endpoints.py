"""Every endpoint's status and shape, including the 404/409/422 cases."""

from __future__ import annotations

import asyncio
import os

import httpx

from tests.conftest import RedisServer, make_settings
from tests.integration.test_stream import join, new_thread, run_body, stream_run, wait_status
from tests.server import Tokenrelay
from tests.sse import events


async def test_thread_lifecycle(client: httpx.AsyncClient) -> None:
    r = await client.post("/threads", json={"metadata": {"a": 1}})
    thread = r.json()
    assert set(thread) >= {
        "thread_id", "created_at", "updated_at", "state_updated_at", "metadata", "status",
        "config", "values", "interrupts", "error",
    }  # fmt: skip
    assert thread["values"] is None
    assert thread["status"] == "idle"
    tid = thread["thread_id"]
    # The answer to the create (which reads neither runs nor state for a new id) is the thread
    # as a read of it shows it.
    assert (await client.get(f"/threads/{tid}")).json() == thread
    r = await client.patch(f"/threads/{tid}", json={"metadata": {"b": 2}})
    assert r.json()["metadata"] == {"a": 1, "b": 2}
    r = await client.patch(
        f"/threads/{tid}", json={"metadata": {"c": 3}}, headers={"Prefer": "return=minimal"}
    )
    assert r.status_code == 204
    assert (await client.get(f"/threads/{tid}")).json()["metadata"] == {"a": 1, "b": 2, "c": 3}
    assert (await client.delete(f"/threads/{tid}")).status_code == 204
    assert (await client.get(f"/threads/{tid}")).status_code == 404
    assert (await client.delete(f"/threads/{tid}")).status_code == 404
    assert (await client.patch("/threads/nope", json={})).status_code == 404


async def test_thread_search_filters_and_paginates(client: httpx.AsyncClient) -> None:
    tag = str(id(client))
    tids = [(await client.post("/threads", json={"metadata": {"tag": tag}})).json()["thread_id"]
            for _ in range(3)]  # fmt: skip
    r = await client.post("/threads/search", json={"metadata": {"tag": tag}, "limit": 2})
    assert r.status_code == 200
    assert len(r.json()) == 2
    assert r.headers["x-pagination-total"] == "3"
    assert r.headers["x-pagination-next"] == "2"
    r = await client.post(
        "/threads/search", json={"metadata": {"tag": tag}, "limit": 2, "offset": 2}
    )
    assert {t["thread_id"] for t in r.json()} <= set(tids)
    assert "x-pagination-next" not in r.headers
    r = await client.post("/threads/search", json={"status": "sleepy"})
    assert r.status_code == 422


async def test_state_history_and_update(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    empty = (await client.get(f"/threads/{tid}/state")).json()
    assert empty["values"] == {}
    assert empty["checkpoint"] is None
    assert empty["next"] == []
    await stream_run(client, tid, run_body())
    state = (await client.get(f"/threads/{tid}/state")).json()
    ckpt = state["checkpoint"]
    assert set(ckpt) >= {"thread_id", "checkpoint_ns", "checkpoint_id"}
    assert state["checkpoint_id"] == ckpt["checkpoint_id"]
    assert state["metadata"]["run_id"]
    assert state["parent_checkpoint"]["checkpoint_id"]
    history = (await client.post(f"/threads/{tid}/history", json={"limit": 10})).json()
    assert history[0]["checkpoint"] == ckpt
    assert [h["checkpoint_id"] for h in history][1] == state["parent_checkpoint_id"]
    older = (await client.get(f"/threads/{tid}/history", params={
        "limit": 1, "before": ckpt["checkpoint_id"]})).json()  # fmt: skip
    assert older[0]["checkpoint_id"] == state["parent_checkpoint_id"]
    at = (await client.get(f"/threads/{tid}/state/{state['parent_checkpoint_id']}")).json()
    assert at["checkpoint_id"] == state["parent_checkpoint_id"]
    posted = await client.post(
        f"/threads/{tid}/state/checkpoint",
        json={"checkpoint": {"checkpoint_id": ckpt["checkpoint_id"]}},
    )
    assert posted.json()["checkpoint_id"] == ckpt["checkpoint_id"]

    r = await client.post(
        f"/threads/{tid}/state",
        json={"values": {"messages": [{"role": "ai", "content": "edited"}]}, "as_node": "llm"},
    )
    assert r.status_code == 200
    new = r.json()["checkpoint"]
    assert new["checkpoint_id"] != ckpt["checkpoint_id"]
    after = (await client.get(f"/threads/{tid}/state")).json()
    assert after["checkpoint_id"] == new["checkpoint_id"]
    assert after["values"]["messages"][-1]["content"] == "edited"
    assert (await client.post("/threads/nope/state", json={"values": {}})).status_code == 404
    assert (await client.post(f"/threads/{tid}/history", json={"limit": 0})).status_code == 422


async def test_update_state_of_a_busy_thread_is_409(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    run = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
    r = await client.post(f"/threads/{tid}/state", json={"values": {}})
    assert r.status_code == 409
    assert (await client.delete(f"/threads/{tid}")).status_code == 409
    assert (await client.delete(f"/threads/{tid}/runs/{run['run_id']}")).status_code == 409
    await wait_status(client, tid, run["run_id"], "success")


async def test_background_run_list_join_and_delete(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    r = await client.post(f"/threads/{tid}/runs", json=run_body())
    assert r.status_code == 200
    run = r.json()
    assert r.headers["content-location"] == f"/threads/{tid}/runs/{run['run_id']}"
    assert run["status"] == "pending"
    assert set(run) >= {"run_id", "thread_id", "assistant_id", "created_at", "updated_at",
                        "status", "metadata", "kwargs", "multitask_strategy"}  # fmt: skip
    joined = await client.get(f"/threads/{tid}/runs/{run['run_id']}/join")
    assert joined.status_code == 200
    assert joined.json()["messages"][-1]["type"] == "ai"
    listed = (await client.get(f"/threads/{tid}/runs")).json()
    assert [x["run_id"] for x in listed] == [run["run_id"]]
    assert (await client.get(f"/threads/{tid}/runs", params={"status": "error"})).json() == []
    assert (await client.get("/threads/nope/runs")).status_code == 404
    assert (await client.get(f"/threads/{tid}/runs", params={"status": "x"})).status_code == 422
    assert (await client.delete(f"/threads/{tid}/runs/{run['run_id']}")).status_code == 204
    assert (await client.get(f"/threads/{tid}/runs/{run['run_id']}")).status_code == 404
    assert (await client.get(f"/threads/{tid}/runs/nope/join")).status_code == 404


async def test_wait_returns_final_values_or_error(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    r = await client.post(f"/threads/{tid}/runs/wait", json=run_body())
    assert r.status_code == 200
    assert r.headers["location"].endswith("/join")
    assert [m["type"] for m in r.json()["messages"]] == ["human", "ai"]
    r = await client.post(f"/threads/{tid}/runs/wait", json=run_body("failing"))
    assert r.status_code == 200
    assert r.json() == {"__error__": {"error": "Boom", "message": "the model caught fire"}}
    r = await client.post("/runs/wait", json=run_body())
    assert len(r.json()["messages"]) == 2
    assert (await client.post("/threads/nope/runs/wait", json=run_body())).status_code == 404


async def test_if_not_exists_create(client: httpx.AsyncClient) -> None:
    tid = "made-on-the-fly-" + str(id(client))
    body = run_body(if_not_exists="create")
    evts, _ = await stream_run(client, tid, body)
    assert evts[-1].event == "values"
    assert (await client.get(f"/threads/{tid}")).json()["metadata"]["graph_id"] == "fast"


async def test_stream_mode_in_every_form(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    forms = [
        ({"stream_mode": "updates"}, None, {"updates"}),
        ({"stream_mode": ["updates", "values"]}, None, {"updates", "values"}),
        ({"stream_mode": '["updates", "values"]'}, None, {"updates", "values"}),
        ({}, [("stream_mode", "updates"), ("stream_mode", "values")], {"updates", "values"}),
        ({}, [("stream_mode", '["messages-tuple"]')], {"messages"}),
    ]
    for body, params, names in forms:
        full = {"assistant_id": "fast", "input": {"messages": []}, **body}
        async with client.stream(
            "POST", f"/threads/{tid}/runs/stream", json=full, params=params
        ) as r:
            assert r.status_code == 200, (body, params, await r.aread())
            got = {e.event for e in await events(r)}
        assert got == {"metadata", *names}, (body, params)
    r = await client.post(
        f"/threads/{tid}/runs/stream", json={"assistant_id": "fast"}, params={"stream_mode": "x"}
    )
    assert r.status_code == 422
    r = await client.post(
        f"/threads/{tid}/runs/stream", json={"assistant_id": "fast"}, params={"stream_mode": "[x"}
    )
    assert r.status_code == 422


async def test_join_can_select_stream_modes(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    evts, _ = await stream_run(client, tid, run_body())
    run_id = evts[0].json()["run_id"]
    url = f"/threads/{tid}/runs/{run_id}/stream"
    async with client.stream(
        "GET", url, params={"stream_mode": "values"}, headers={"Last-Event-ID": "-1"}
    ) as r:
        only = await events(r)
    assert {e.event for e in only} == {"metadata", "values"}
    assert [e.id for e in only] == [e.id for e in evts if e.event in ("metadata", "values")]


async def test_thread_join_stream(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    assert (await client.get(f"/threads/{tid}/stream")).status_code == 204
    # A client that asks for an event stream by name gets an empty one.
    idle = await client.get(f"/threads/{tid}/stream", headers={"Accept": "text/event-stream"})
    assert (idle.status_code, idle.content) == (200, b"")
    assert idle.headers["content-type"].startswith("text/event-stream")
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=3)
        async with client.stream(
            "GET", f"/threads/{tid}/stream", headers={"Last-Event-ID": "-1"}
        ) as j:
            assert j.headers["location"].endswith(f"/runs/{head[0].json()['run_id']}/stream")
            joined = await events(j)
        reference = head + await events(r)
    assert [e.id for e in joined] == [e.id for e in reference]
    assert (await client.get(f"/threads/{tid}/stream")).status_code == 204
    assert (await client.get("/threads/nope/stream")).status_code == 404


async def test_thread_join_selects_stream_modes(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
        head = await events(r, limit=3)
        async with client.stream(
            "GET", f"/threads/{tid}/stream", params={"stream_mode": "values"},
            headers={"Last-Event-ID": "-1"},
        ) as j:  # fmt: skip
            only = await events(j)
        reference = head + await events(r)
    assert {e.event for e in only} == {"metadata", "values"}
    assert [e.id for e in only] == [e.id for e in reference if e.event in ("metadata", "values")]
    # The SDKs' own thread modes: "run_modes" (their default) is every event, "lifecycle" the
    # run's start.
    for mode in ("run_modes", "lifecycle"):
        run = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
        async with client.stream(
            "GET", f"/threads/{tid}/stream", params={"stream_mode": mode},
            headers={"Last-Event-ID": "-1"},
        ) as j:  # fmt: skip
            got = await events(j)
        url = f"/threads/{tid}/runs/{run['run_id']}/stream"
        async with client.stream("GET", url, headers={"Last-Event-ID": "-1"}) as r:
            everything = await events(r)
        keep = {"metadata"} if mode == "lifecycle" else {e.event for e in everything}
        assert [e.id for e in got] == [e.id for e in everything if e.event in keep], mode
        assert len(got) == 1 if mode == "lifecycle" else len(got) > 3


async def test_assistants(client: httpx.AsyncClient) -> None:
    found = (await client.post("/assistants/search", json={"graph_id": "agent"})).json()
    assert len(found) == 1
    agent = found[0]
    assert set(agent) >= {"assistant_id", "graph_id", "config", "metadata", "name", "version"}
    assert (await client.get(f"/assistants/{agent['assistant_id']}")).json() == agent
    assert (await client.get("/assistants/agent")).json() == agent
    assert (await client.get("/assistants/ghost")).status_code == 404
    graph = (await client.get("/assistants/agent/graph")).json()
    assert {"source": "__start__", "target": "llm"} in graph["edges"]
    schemas = (await client.get("/assistants/agent/schemas")).json()
    assert schemas["graph_id"] == "agent"
    assert "messages" in str(schemas["input_schema"])


async def test_ops_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/ok")).json() == {"ok": True}
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ok"}
    info = (await client.get("/info")).json()
    assert info["flags"]["assistants"] is True
    spec = (await client.get("/openapi.json")).json()
    assert "/threads/{thread_id}/runs/stream" in spec["paths"]
    metrics = (await client.get("/metrics")).text
    assert "tokenrelay_api_streams_open" in metrics
    assert (await client.get("/docs")).status_code == 200


async def test_long_poll_errors(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    assert (await client.get(f"/threads/{tid}/runs/nope/events")).status_code == 404
    evts, _ = await stream_run(client, tid, run_body())
    run_id = evts[0].json()["run_id"]
    url = f"/threads/{tid}/runs/{run_id}/events"
    assert (await client.get(url, params={"after": "junk"})).status_code == 400
    assert (await client.get(url, params={"wait_ms": -1})).status_code == 422
    page = (await client.get(url, params={"after": evts[-1].id})).json()
    assert page == {"events": [], "next": page["next"], "done": True}
    again = await join(client, tid, run_id, evts[-1].id)
    assert again == []
    await asyncio.sleep(0)


async def test_interrupt_before_pauses_and_a_null_input_resumes(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    body = run_body(interrupt_before=["llm"])
    waited = (await client.post(f"/threads/{tid}/runs/wait", json=body)).json()
    assert [m["type"] for m in waited["messages"]] == ["human"]
    state = (await client.get(f"/threads/{tid}/state")).json()
    assert state["next"] == ["llm"]
    assert (await client.get(f"/threads/{tid}")).json()["status"] == "interrupted"
    resumed = (
        await client.post(f"/threads/{tid}/runs/wait", json={"assistant_id": "fast", "input": None})
    ).json()
    assert [m["type"] for m in resumed["messages"]] == ["human", "ai"]


async def test_durability_decides_which_checkpoints_a_run_keeps(
    client: httpx.AsyncClient,
) -> None:
    async def checkpoints(**durability: object) -> tuple[int, list[str]]:
        tid = await new_thread(client)
        r = await client.post(f"/threads/{tid}/runs/wait", json=run_body(**durability))
        assert r.status_code == 200, r.text
        history = (await client.post(f"/threads/{tid}/history", json={"limit": 50})).json()
        return len(history), [m["type"] for m in history[0]["values"]["messages"]]

    # Every step's checkpoint by default and with `sync`; only the run's last with `exit`
    # (and with the deprecated `checkpoint_during: false`, which LangGraph maps to it).
    steps, final = await checkpoints()
    assert final == ["human", "ai"] and steps > 1
    assert await checkpoints(durability="sync") == (steps, final)
    assert await checkpoints(durability="async") == (steps, final)
    assert await checkpoints(durability="exit") == (1, final)
    assert await checkpoints(checkpoint_during=False) == (1, final)
    assert await checkpoints(checkpoint_during=True) == (steps, final)
    tid = await new_thread(client)
    for bad in ({"durability": "never"}, {"durability": "exit", "checkpoint_during": True}):
        r = await client.post(f"/threads/{tid}/runs/wait", json=run_body(**bad))
        assert r.status_code == 422, r.text
        assert "durability" in r.text
    assert (await client.get(f"/threads/{tid}/runs")).json() == []


async def test_counts_copy_subgraphs_and_batch(client: httpx.AsyncClient) -> None:
    tag = f"count-{id(client)}"
    for _ in range(2):
        await client.post("/threads", json={"metadata": {"tag": tag}})
    assert (await client.post("/threads/count", json={"metadata": {"tag": tag}})).json() == 2
    assert (await client.post("/assistants/count", json={"graph_id": "fast"})).json() == 1

    tid = await new_thread(client)
    await stream_run(client, tid, run_body())
    copied = (await client.post(f"/threads/{tid}/copy")).json()
    assert copied["thread_id"] != tid
    original = (await client.get(f"/threads/{tid}/state")).json()
    copy_state = (await client.get(f"/threads/{copied['thread_id']}/state")).json()
    assert copy_state["values"] == original["values"]
    assert (await client.post("/threads/nope/copy")).status_code == 404

    subgraphs = (await client.get("/assistants/nested/subgraphs")).json()
    assert list(subgraphs) == ["inner"]
    assert (await client.get("/assistants/fast/subgraphs")).json() == {}

    runs = (await client.post("/runs/batch", json=[run_body(), run_body()])).json()
    assert len(runs) == 2
    for run in runs:
        await wait_status(client, run["thread_id"], run["run_id"], "success")


async def test_console_page_and_its_icon(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "runs/stream" in r.text
    assert "Last-Event-ID" in r.text
    icon = await client.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/svg+xml"
    assert icon.text.startswith("<svg")


async def test_stats_count_runs_across_workers_and_this_process_streams(
    redis_server: RedisServer,
) -> None:
    # A relay of its own: a fresh key prefix, so no other test's runs are in its queue.
    relay = Tokenrelay(make_settings(redis_server)).start()
    try:
        async with httpx.AsyncClient(base_url=relay.url, timeout=30) as client:
            idle = (await client.get("/stats")).json()
            assert set(idle) == {
                "runs_running", "runs_waiting", "streams_open", "events_sent", "pid"
            }  # fmt: skip
            assert (idle["runs_running"], idle["runs_waiting"]) == (0, 0)
            assert idle["pid"] == os.getpid()  # this relay serves from the test's process

            tid = await new_thread(client)
            run = (await client.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()
            await wait_status(client, tid, run["run_id"], "running")
            url = f"/threads/{tid}/runs/{run['run_id']}/stream"
            async with client.stream("GET", url) as r:
                await events(r, limit=2)
                busy = (await client.get("/stats")).json()
            assert (busy["runs_running"], busy["runs_waiting"]) == (1, 0)
            assert busy["streams_open"] >= 1
            assert busy["events_sent"] >= idle["events_sent"] + 2

            cancel = f"/threads/{tid}/runs/{run['run_id']}/cancel?wait=1"
            assert (await client.post(cancel)).json()["status"] == "interrupted"
            for _ in range(100):  # the job leaves the queue just after the run's end
                done = (await client.get("/stats")).json()
                if done["runs_running"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert (done["runs_running"], done["runs_waiting"]) == (0, 0)
    finally:
        relay.stop()


async def test_metadata_merges_made_at_once_all_land(client: httpx.AsyncClient) -> None:
    """A rename sent beside a run's start (as the console does), and merges racing each other:
    none drops another's keys."""
    tid = (await client.post("/threads", json={"metadata": {"title": "New thread"}})).json()
    tid = tid["thread_id"]

    async def merge(i: int) -> int:
        r = await client.patch(f"/threads/{tid}", json={"metadata": {f"k{i}": i}})
        return r.status_code

    statuses = await asyncio.gather(
        *(merge(i) for i in range(20)),
        client.patch(f"/threads/{tid}", json={"metadata": {"title": "renamed"}}),
        client.post(f"/threads/{tid}/runs", json=run_body("fast")),
    )
    assert all(s == 200 for s in statuses[:20])
    metadata = (await client.get(f"/threads/{tid}")).json()["metadata"]
    assert {f"k{i}": i for i in range(20)}.items() <= metadata.items()
    assert metadata["title"] == "renamed"
    assert metadata["graph_id"] == "fast"
