"""tokenrelay on a Redis reached through a Unix socket (``unix:///path``), as on a host where
Redis listens on no TCP port: runs stream, are joined, cancelled and read back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import make_settings
from tests.integration.test_stream import new_thread, run_body, wait_status
from tests.server import serving
from tests.sse import events
from tokenrelay.broker.embedded import EmbeddedRedis


@pytest.fixture
def socket_redis(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A redis-server, and its URL through its Unix socket."""
    path = tmp_path / "redis.sock"
    server = EmbeddedRedis(extra_args=["--unixsocket", str(path), "--unixsocketperm", "700"])
    server.start()
    yield SimpleNamespace(url=f"unix://{path}")
    server.close()


async def test_a_run_streams_and_is_cancelled_over_a_unix_socket(
    socket_redis: SimpleNamespace,
) -> None:
    async with serving(make_settings(socket_redis)) as (c, redis):  # type: ignore[arg-type]
        assert (await c.get("/readyz")).status_code == 200
        tid = await new_thread(c)
        async with c.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("fast")) as r:
            assert r.status_code == 200
            evts = await events(r)
        assert evts[0].event == "metadata" and evts[-1].event == "values"
        run_id = evts[0].json()["run_id"]
        # Joined again from the start: the same events, read back from the stream.
        joined = f"/threads/{tid}/runs/{run_id}/stream"
        async with c.stream("GET", joined, headers={"Last-Event-ID": "0"}) as r:
            again = await events(r)
        assert [e.id for e in again] == [e.id for e in evts]

        slow = (await c.post(f"/threads/{tid}/runs", json=run_body("slow"))).json()["run_id"]
        async with c.stream("GET", f"/threads/{tid}/runs/{slow}/stream") as r:
            await events(r, limit=3)
            cancel = await c.post(f"/threads/{tid}/runs/{slow}/cancel", params={"wait": "1"})
            assert cancel.status_code == 200
        await wait_status(c, tid, slow, "interrupted")
        assert await redis.ping()
