"""The real JS clients (`@langchain/langgraph-sdk` and its React `useStream`, `ai`'s
`DefaultChatTransport`, `@ai-sdk/react`'s `useChat`) against a real tokenrelay, unchanged.

The tests themselves live in clients/js/test/ and run under `node --test`; each pytest test
runs one of those files with TOKENRELAY_URL pointing at the `relay` fixture's server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server import Tokenrelay

JS_DIR = Path(__file__).resolve().parents[2] / "clients" / "js"
TIMEOUT_SECONDS = 300
MIN_NODE = (20, 19)

pytestmark = pytest.mark.timeout(TIMEOUT_SECONDS + 30)


def run_node_tests(relay: Tokenrelay, test_file: str, env: dict[str, str] | None = None) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "these tests need Node.js (20.19 or newer) and npm on PATH (Debian: "
            "`apt-get install nodejs npm`; ./scripts/test installs them)"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if tuple(int(p) for p in version.lstrip("v").split(".")[:2]) < MIN_NODE:
        pytest.fail(f"these tests need Node.js 20.19 or newer, found {version}")
    if not (JS_DIR / "node_modules").is_dir():
        pytest.fail(
            f"the JS client packages are not installed: run `npm ci` in {JS_DIR} "
            "(./scripts/test does)"
        )
    env = {**os.environ, **(env or {}), "TOKENRELAY_URL": relay.url, "NO_COLOR": "1",
           "FORCE_COLOR": "0"}  # fmt: skip
    try:
        proc = subprocess.run(
            [node, "--test", "--test-reporter=spec", f"test/{test_file}"],
            cwd=JS_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"node --test {test_file} took over {TIMEOUT_SECONDS} s:\n{out or ''}")
    if proc.returncode != 0:
        pytest.fail(
            f"node --test {test_file} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )


def test_langgraph_js_sdk(relay: Tokenrelay) -> None:
    """`Client`: threads, resumable streams, joinStream after an abort, cancel, multitask."""
    run_node_tests(relay, "sdk.test.js")


def test_react_use_stream(relay: Tokenrelay) -> None:
    """`useStream`: reconnectOnMount after an unmount, stop(), multitaskStrategy interrupt."""
    run_node_tests(relay, "use-stream.test.js")


def test_ai_sdk(relay: Tokenrelay) -> None:
    """`DefaultChatTransport` and `useChat({resume: true})` on the /ai/chat endpoints."""
    run_node_tests(relay, "ai-sdk.test.js")


def test_react_v1_use_stream(relay: Tokenrelay) -> None:
    """`@langchain/react` 1.x `useStream` on the agent streaming protocol, over SSE and over a
    WebSocket: submit, reload mid-run, stop() keeping the partial, respond() to an interrupt, a
    subgraph's namespace, and a proxy that cuts the stream mid-body."""
    run_node_tests(relay, "react-v1.test.js")
