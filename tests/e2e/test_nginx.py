"""A real nginx with the shipped config in front of two API processes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_settings
from tests.integration.test_stream import join, new_thread, run_body
from tests.server import Tokenrelay, WorkerProcess
from tests.sse import SSE, Comment, iter_sse
from tokenrelay.broker.embedded import EmbeddedRedis, free_port

pytestmark = pytest.mark.timeout(120)

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "tokenrelay.conf"


def nginx_binary() -> str:
    """The nginx executable, or a failure that says how to get one."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        pytest.fail(
            "this test needs nginx: install it (Debian: `apt-get install nginx`), or run the "
            "tests with ./scripts/test, which does",
            pytrace=False,
        )
    return binary


class Nginx:
    """nginx in the foreground with the shipped server block; the upstream lines name the two
    API processes (the second as backup, so the test knows which one serves first)."""

    def __init__(self, binary: str, workdir: Path, primary: int, backup: int) -> None:
        self.port = free_port()
        self.binary = binary
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        site = SHIPPED.read_text()
        site = re.sub(
            r"server api:2024[^;]*;",
            f"server 127.0.0.1:{primary} max_fails=1 fail_timeout=2s;\n"
            f"    server 127.0.0.1:{backup} backup;",
            site,
        )
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        (workdir / "site.conf").write_text(site)
        (workdir / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log;\nevents {{}}\n"
            f"http {{\n access_log off;\n client_body_temp_path {workdir};\n"
            f" proxy_temp_path {workdir};\n include {workdir}/site.conf;\n}}\n"
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if self.proc.poll() is not None:
                break
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        log = self.workdir / "error.log"
        raise RuntimeError(
            f"nginx did not start (exit code {self.proc.poll()}): "
            + (log.read_text() if log.exists() else "no error.log")
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def stack(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[tuple[Nginx, WorkerProcess]]:
    binary = nginx_binary()
    settings = make_settings(redis_server)
    # Each part is registered for clean-up before it starts, so a later failure stops it too.
    with contextlib.ExitStack() as cleanup:
        worker = Tokenrelay(settings)  # an API plus the worker, in this process
        cleanup.callback(worker.stop)
        worker.start()
        primary = WorkerProcess(settings, tmp_path / "api-a.log", command="api")
        cleanup.callback(primary.stop)
        primary.start()
        proxy = Nginx(binary, tmp_path, primary.port, worker.port)
        cleanup.callback(proxy.stop)
        proxy.start()
        yield proxy, primary


async def read_then_kill(r: httpx.Response, got: list[SSE], primary: WorkerProcess) -> None:
    async for item in iter_sse(r):
        if isinstance(item, SSE):
            got.append(item)
            if len(got) == 10:
                primary.signal(signal.SIGKILL)


async def test_sse_through_nginx_is_unbuffered_and_survives_a_dead_replica(
    stack: tuple[Nginx, WorkerProcess],
) -> None:
    proxy, primary = stack
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:
        # Heartbeats of an idle run arrive one by one, before any token: nothing is buffered.
        tid = await new_thread(client)
        order: list[str] = []
        async with client.stream(
            "POST", f"/threads/{tid}/runs/stream", json=run_body("quiet")
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for item in iter_sse(r):
                order.append("heartbeat" if isinstance(item, Comment) else item.event)
        first_token = order.index("messages")
        assert order[:first_token].count("heartbeat") >= 2

        # The replica serving a stream is killed: the client resumes through nginx.
        tid = await new_thread(client)
        got: list[SSE] = []
        async with client.stream("POST", f"/threads/{tid}/runs/stream", json=run_body("slow")) as r:
            location = r.headers["location"]
            with pytest.raises(httpx.RemoteProtocolError):
                await read_then_kill(r, got, primary)
        async with client.stream("GET", location, headers={"Last-Event-ID": got[-1].id or ""}) as r:
            got += [item async for item in iter_sse(r) if isinstance(item, SSE)]
        run_id = location.split("/")[-2]
        reference = await join(client, tid, run_id, "-1")
    assert [(e.id, e.data) for e in got] == [(e.id, e.data) for e in reference]
    text = "".join(e.json()[0]["content"] for e in got if e.event == "messages")
    assert text.count(" ") + 1 == 60
