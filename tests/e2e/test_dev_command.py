"""`tokenrelay dev` with no Redis configured: it embeds one and serves a run end to end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tokenrelay.broker.embedded import free_port


@contextlib.contextmanager
def running_dev(
    log: Path, port: int | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`tokenrelay dev` on `port` (default: a free one) with no Redis configured (and `env`
    added), its output in `log`, until the block ends; stopped with SIGINT as a terminal would."""
    port = port or free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    child_env.update(env)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)],
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"tokenrelay dev did not start: {log.read_text()}")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    log = tmp_path / "dev.log"
    demo = {"TOKENRELAY_DEMO_REPLY_WORDS": "12", "TOKENRELAY_DEMO_TOKEN_DELAY_MS": "5"}
    with running_dev(log, **demo) as (url, proc):
        yield url, proc, log


def test_dev_serves_a_run_on_embedded_redis(
    dev_server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, proc, log = dev_server
    tid = httpx.post(url + "/threads", json={}).json()["thread_id"]
    body = {
        "assistant_id": "agent",
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "stream_mode": ["messages-tuple", "values"],
    }
    with httpx.stream("POST", f"{url}/threads/{tid}/runs/stream", json=body, timeout=30) as r:
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b.startswith("event:")]
    assert blocks[0].startswith("event: metadata\n")
    assert all("\nid: " in b for b in blocks)
    words = [b for b in blocks if b.startswith("event: messages\n")]
    assert len(words) >= 12
    assert httpx.get(url + "/readyz").json() == {"status": "ok"}
    # The API and the worker are processes of their own that share one checkpointer: the
    # state the worker wrote is what the API reads.
    roles = sorted(
        next(a for a in child.cmdline() if a in ("api", "worker"))
        for child in psutil.Process(proc.pid).children()
        if "tokenrelay.producer.cli" in child.cmdline()
    )
    assert roles[0] == "api" and set(roles[1:]) == {"worker"}
    state = httpx.get(f"{url}/threads/{tid}/state").json()
    assert [m["type"] for m in state["values"]["messages"]] == ["human", "ai"]

    # The embedded Redis goes away with the process (SIGTERM, as an orchestrator sends it).
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    out = log.read_text()
    assert "tokenrelay dev: " + url in out
    assert "curl" in out
    redis_port = int(out.split("redis://127.0.0.1:")[1].split("/")[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()


def test_dev_on_a_taken_port_says_so_in_one_line_before_anything_else() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
        done = subprocess.run(
            [sys.executable, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert f"127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr
