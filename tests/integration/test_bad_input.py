"""Bad input gets a clear 4xx with a JSON body, never a 500 or a hang."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.test_stream import new_thread, run_body, stream_run

pytestmark = pytest.mark.redis("standalone", "cluster")


async def test_unknown_thread_is_404_json(client: httpx.AsyncClient) -> None:
    r = await client.post("/threads/nope/runs/stream", json=run_body())
    assert r.status_code == 404
    assert r.json() == {"detail": "Thread with ID nope not found"}
    r = await client.get("/threads/nope")
    assert r.status_code == 404 and "not found" in r.json()["detail"]


async def test_unknown_run_is_404_json(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    for path in (f"/threads/{tid}/runs/missing", f"/threads/{tid}/runs/missing/stream"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.json() == {"detail": "Run with ID missing not found"}


async def test_run_of_another_thread_is_404(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    evts, _ = await stream_run(client, tid, run_body())
    run_id = evts[0].json()["run_id"]
    other = await new_thread(client)
    assert (await client.get(f"/threads/{other}/runs/{run_id}")).status_code == 404
    assert (await client.get(f"/threads/{other}/runs/{run_id}/stream")).status_code == 404


@pytest.mark.parametrize("bad", ["abc", "12", "1-2-3", "-5", "1.5-0", "99999999999999999999999-0"])
async def test_malformed_last_event_id_is_400_json(client: httpx.AsyncClient, bad: str) -> None:
    tid = await new_thread(client)
    evts, _ = await stream_run(client, tid, run_body())
    run_id = evts[0].json()["run_id"]
    url = f"/threads/{tid}/runs/{run_id}/stream"
    r = await client.get(url, headers={"Last-Event-ID": bad})
    assert r.status_code == 400
    assert "Last-Event-ID" in r.json()["detail"]
    r = await client.get(url, params={"last_event_id": bad})
    assert r.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"assistant_id": "fast", "stream_mode": "telepathy"},
        {"assistant_id": "fast", "stream_mode": ["values", 3]},
        {"assistant_id": "fast", "on_disconnect": "explode"},
        {"assistant_id": "fast", "config": "not an object"},
        {"assistant_id": 12},
    ],
)
async def test_invalid_body_is_422(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    tid = await new_thread(client)
    r = await client.post(f"/threads/{tid}/runs/stream", json=body)
    assert r.status_code == 422
    assert r.json()["detail"]


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    r = await client.post(
        f"/threads/{tid}/runs/stream",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422


async def test_unknown_assistant_is_404(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    r = await client.post(f"/threads/{tid}/runs/stream", json=run_body("ghost"))
    assert r.status_code == 404
    assert r.json() == {"detail": "Assistant with ID ghost not found"}


async def test_existing_thread_id_is_409_unless_do_nothing(client: httpx.AsyncClient) -> None:
    tid = await new_thread(client)
    r = await client.post("/threads", json={"thread_id": tid})
    assert r.status_code == 409
    r = await client.post("/threads", json={"thread_id": tid, "if_exists": "do_nothing"})
    assert r.status_code == 200 and r.json()["thread_id"] == tid
    r = await client.post("/threads", json={"thread_id": "a{b}"})
    assert r.status_code == 422
    # A thread created on the fly from the path obeys the same rule: braces in an id would move
    # its keys to other slots of a Redis Cluster.
    for odd in ("}a{b", "a:b"):
        body = {**run_body(), "if_not_exists": "create"}
        r = await client.post(f"/threads/{odd}/runs/stream", json=body)
        assert r.status_code == 422, odd
        assert "thread_id" in r.json()["detail"]
