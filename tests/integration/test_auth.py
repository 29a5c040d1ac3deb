"""The auth layer on a real server: what `@auth.authenticate` is given and how its refusals are
answered, which `@auth.on` handler runs, filter operators, and stream tokens beside API keys."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests import authproject
from tests.conftest import RedisServer, make_settings
from tests.graphs import GRAPHS
from tests.server import Tokenrelay

pytestmark = pytest.mark.redis("standalone")  # HTTP only


@pytest.fixture(scope="module")
def custom(redis_server: RedisServer) -> Iterator[Tokenrelay]:
    settings = make_settings(
        redis_server,
        auth="tests.authproject:auth",
        http_app="tests.authproject:webapp",
        graphs={**GRAPHS, "whoami": "tests.authproject:whoami"},
    )
    server = Tokenrelay(settings).start()
    yield server
    server.stop()


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}"}


async def test_authenticate_refusals_keep_their_status_and_message(custom: Tokenrelay) -> None:
    async with httpx.AsyncClient(base_url=custom.url, timeout=30) as c:
        for headers, status, detail in (
            ({}, 401, "no token"),
            (as_("suspended"), 403, "account suspended"),
            (as_("broken"), 401, "token signature does not verify"),
        ):
            r = await c.post("/threads/search", json={}, headers=headers)
            assert (r.status_code, r.json()) == (status, {"detail": detail})
        assert (await c.get("/readyz")).status_code == 200
        # http.app's routes are open unless enable_custom_route_auth asks otherwise, as on the
        # Agent Server; the API's routes, including unknown methods on them, are not.
        assert (await c.get("/hello")).text == "hello"
        assert (await c.get("/threads/search")).status_code == 401


async def test_handlers_see_the_request_and_scope_threads(custom: Tokenrelay) -> None:
    async with httpx.AsyncClient(base_url=custom.url, timeout=30) as c:
        body = {"metadata": {"invite": ["bob"]}}
        thread = (await c.post("/threads", json=body, headers=as_("alice"))).json()
        tid = thread["thread_id"]
        assert authproject.SEEN[-1]["body"] == body
        assert thread["metadata"] == {"invite": ["bob"], "owner": "alice",
                                      "members": ["alice", "bob"]}  # fmt: skip

        # bob is a member: the threads.read handler, more specific than the global one, lets
        # him read; dave is not, and the thread does not exist for him.
        r = await c.get(f"/threads/{tid}", params={"x": "1"}, headers=as_("bob"))
        assert r.status_code == 200
        seen = authproject.SEEN[-1]
        assert (seen["path"], seen["method"]) == (f"/threads/{tid}", "GET")
        assert (seen["path_params"], seen["query_params"]) == ({"thread_id": tid}, {"x": "1"})
        assert seen["headers"][b"authorization"] == b"Bearer bob"
        r = await c.get(f"/threads/{tid}/state", headers=as_("dave"))
        assert (r.status_code, r.json()) == (404, {"detail": f"Thread with ID {tid} not found"})

        # Search has no handler of its own: the global one scopes it to the owner.
        found = (await c.post("/threads/search", json={}, headers=as_("alice"))).json()
        assert [t["thread_id"] for t in found] == [tid]
        assert (await c.post("/threads/search", json={}, headers=as_("bob"))).json() == []

        # threads.update answers False to all but the red team: a 403, whatever the thread.
        patch = {"metadata": {"topic": "x"}}
        r = await c.patch(f"/threads/{tid}", json=patch, headers=as_("bob"))
        assert (r.status_code, r.json()) == (403, {"detail": "Forbidden"})
        r = await c.patch(f"/threads/{tid}", json=patch, headers=as_("carol"))
        assert (r.status_code, r.json()["metadata"]["topic"]) == (200, "x")


async def test_joins_answer_as_the_other_routes(custom: Tokenrelay) -> None:
    """The joins bind their own arguments (api/direct.py): who may join, and what a refused
    or malformed join is told, are those of the routes FastAPI binds."""
    async with httpx.AsyncClient(base_url=custom.url, timeout=30) as c:
        invite = {"metadata": {"invite": ["bob"]}}
        tid = (await c.post("/threads", json=invite, headers=as_("alice"))).json()["thread_id"]
        body = {"assistant_id": "ask", "input": {"messages": []}}
        r = await c.post(f"/threads/{tid}/runs", json=body, headers=as_("alice"))
        rid = r.json()["run_id"]
        run = f"/threads/{tid}/runs/{rid}"
        for headers in ({}, as_("suspended"), as_("dave")):  # 401, 403, someone else's: 404
            want = await c.get(run, headers=headers)
            assert want.status_code in (401, 403, 404)
            for path in (f"{run}/stream", f"/threads/{tid}/stream"):
                r = await c.get(path, headers=headers)
                assert (r.status_code, r.json()) == (want.status_code, want.json()), path
        async with c.stream("GET", f"{run}/stream", headers=as_("bob")) as r:
            assert r.status_code == 200  # a member: the threads.read handler lets him join
        for bad in ("0", "-1", "abc", "nan"):
            params = {"max_seconds": bad}
            want = await c.post(f"/threads/{tid}/runs/stream", params=params, json=body,
                                headers=as_("alice"))  # fmt: skip
            assert want.status_code == 422
            for path in (f"{run}/stream", f"/threads/{tid}/stream"):
                r = await c.get(path, params=params, headers=as_("alice"))
                assert (r.status_code, r.json()) == (422, want.json()), path


async def test_the_graph_is_told_who_started_the_run(custom: Tokenrelay) -> None:
    async with httpx.AsyncClient(base_url=custom.url, timeout=30) as c:
        tid = (await c.post("/threads", json={}, headers=as_("carol"))).json()["thread_id"]
        body = {"assistant_id": "whoami", "input": {"messages": []},
                "config": {"configurable": {"langgraph_auth_user_id": "forged"}}}  # fmt: skip
        r = await c.post(f"/threads/{tid}/runs/wait", json=body, headers=as_("carol"))
        assert r.json()["messages"][-1]["content"] == "carol carol ['team:red']"


async def test_stream_tokens_beside_api_keys(redis_server: RedisServer) -> None:
    server = Tokenrelay(make_settings(redis_server, api_keys=["k1"])).start()
    try:
        key = {"x-api-key": "k1"}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            tid = (await c.post("/threads", json={}, headers=key)).json()["thread_id"]
            body = {"assistant_id": "ask", "input": {"messages": []}}
            rid = (await c.post(f"/threads/{tid}/runs", json=body, headers=key)).json()["run_id"]
            assert (await c.post(f"/threads/{tid}/stream_token")).status_code == 401
            r = await c.post(f"/threads/{tid}/stream_token", json={"run_id": rid}, headers=key)
            token = {"stream_token": r.json()["token"]}

            # No key, only the token: the run's long-poll and join answer, nothing else.
            r = await c.get(f"/threads/{tid}/runs/{rid}/events", params={**token, "wait_ms": 0})
            assert r.status_code == 200
            r = await c.get(f"/threads/{tid}/runs/{rid}/join", params=token)
            assert r.status_code == 200
            for method, path in (
                ("GET", f"/threads/{tid}/stream"),  # a run-bound token is not the thread's
                ("GET", f"/threads/{tid}/runs/{rid}"),
                ("POST", f"/threads/{tid}/runs/{rid}/cancel"),
                ("POST", f"/threads/{tid}/stream_token"),
            ):
                r = await c.request(method, path, params=token)
                assert (r.status_code, r.json()) == (
                    403, {"detail": "the stream token does not grant this stream"},
                ), path  # fmt: skip
            r = await c.post("/threads", json={})
            assert r.status_code == 401

            # A thread-wide token: the AI SDK's resume and the agent protocol's event stream.
            idle = (await c.post("/threads", json={}, headers=key)).json()["thread_id"]
            r = await c.post(f"/threads/{idle}/stream_token", headers=key)
            token = {"stream_token": r.json()["token"]}
            assert (await c.get(f"/ai/chat/{idle}/stream", params=token)).status_code == 204
            events = f"/threads/{idle}/stream/events"
            async with c.stream(
                "POST", events, params=token, json={"channels": ["lifecycle"]}
            ) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
            r = await c.post(f"/threads/{idle}/commands", params=token, json={})
            assert r.status_code == 403
    finally:
        server.stop()
