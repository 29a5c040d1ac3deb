"""`tokenrelay worker` start-up checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.embedded import EmbeddedRedis
from tests.conftest import make_settings
from tests.server import WorkerProcess


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("no_such_module:graph", "cannot import 'no_such_module'"),
        ("producer.demo:nothing", "has no attribute 'nothing'"),
        ("producer.demo:reply_text", "calling it as a graph factory failed"),
        ("producer.demo:model", "is a FakeStreamingChatModel, not a LangGraph graph"),
        ("producer.demo", "must look like 'module:attr'"),
    ],
)
def test_a_wrong_graph_spec_fails_at_start_naming_it(spec: str, complaint: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["TOKENRELAY_GRAPHS"] = json.dumps({"mine": spec})
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker"],
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
