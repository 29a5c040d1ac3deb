"""`tokenrelay worker` start-up checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from redis import Redis

from tests.conftest import make_settings
from tests.server import WorkerProcess
from tokenrelay.broker.embedded import EmbeddedRedis


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("no_such_module:graph", "cannot import 'no_such_module'"),
        ("tokenrelay.producer.demo:nothing", "has no attribute 'nothing'"),
        ("tokenrelay.producer.demo:reply_text", "calling it as a graph factory failed"),
        ("tokenrelay.producer.demo:model", "is a FakeStreamingChatModel, not a LangGraph graph"),
        ("tokenrelay.producer.demo", "must look like 'module:attr'"),
    ],
)
def test_a_wrong_graph_spec_fails_at_start_naming_it(spec: str, complaint: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["TOKENRELAY_GRAPHS"] = json.dumps({"mine": spec})
    proc = subprocess.run(
        [sys.executable, "-m", "tokenrelay.producer.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert spec in proc.stderr
    assert complaint in proc.stderr


def test_memory_checkpointer_with_several_workers_is_called_out(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = make_settings(redis_server)
    first = WorkerProcess(settings, tmp_path / "a.log").start()
    second = WorkerProcess(settings, tmp_path / "b.log").start()
    try:
        assert (
            "TOKENRELAY_CHECKPOINTER=memory with 1 other live worker"
            in (tmp_path / "b.log").read_text()
        )
    finally:
        first.stop()
        second.stop()


def test_processes_run_side_by_side_and_stop_together(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """`--processes 2` on a shared checkpointer: two workers, each with its own liveness key,
    both gone after one SIGTERM to the command."""
    settings = make_settings(redis_server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env.update(
        TOKENRELAY_REDIS_URL=redis_server.url,
        TOKENRELAY_KEY_PREFIX=settings.key_prefix,
        TOKENRELAY_CHECKPOINTER=f"sqlite:///{tmp_path}/checkpoints.sqlite",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.producer.cli", "worker", "--processes", "2"], env=env
    )
    redis = Redis.from_url(redis_server.url)
    try:
        pattern = f"{settings.key_prefix}:worker:*"
        deadline = time.monotonic() + 60
        while len(redis.keys(pattern)) < 2:
            assert proc.poll() is None, "the command exited"
            assert time.monotonic() < deadline, "two workers never registered"
            time.sleep(0.1)
        children = psutil.Process(proc.pid).children()
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not any(child.is_running() and child.status() != "zombie" for child in children)
        assert redis.keys(pattern) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        redis.close()
