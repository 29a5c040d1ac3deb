"""The shell and Python blocks of README.md and docs/clients.md run as written against a real
`tokenrelay dev`: the walk-through's drop, resume and stop, and the SDK snippet.

A block right after a `<!-- not-run -->` line is left out (the install and test commands). The
demo is slowed down so that the steps that stop a live run find it live; only the port of
`localhost:2024` / `127.0.0.1:2024` is changed, to the server's free one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import HumanMessage

from tests.e2e.test_dev_command import running_dev
from tokenrelay.producer.demo import reply_text

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CLIENTS = ROOT / "docs" / "clients.md"
NOT_RUN = "<!-- not-run -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)

# Long enough (50 s) that a run is still live when a walk-through step stops it; stopped runs end
# there, so the tests do not wait for it.
REPLY_WORDS = 1000
TOKEN_DELAY_MS = 50

pytestmark = pytest.mark.timeout(180)


def blocks(doc: Path, lang: str, *, skipped: bool = False) -> list[str]:
    """The `lang` blocks of `doc`: those that run, or with `skipped` those marked not to."""
    text = doc.read_text()
    out = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if match.group(1) == lang and (before == NOT_RUN) == skipped:
            out.append(match.group(2))
    return out


def on_port(code: str, port: int) -> str:
    return re.sub(r"\b(localhost|127\.0\.0\.1):2024\b", rf"\1:{port}", code)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("docs") / "dev.log"
    with running_dev(
        log,
        TOKENRELAY_DEMO_REPLY_WORDS=str(REPLY_WORDS),
        TOKENRELAY_DEMO_TOKEN_DELAY_MS=str(TOKEN_DELAY_MS),
    ) as (url, _proc):
        yield url


def run_code(args: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, input=code, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def assert_stopped_with_partial(url: str, thread_id: str, run_id: str) -> str:
    """The run was interrupted while live: the thread holds the first words of the reply."""
    run = httpx.get(f"{url}/threads/{thread_id}/runs/{run_id}").json()
    assert run["status"] == "interrupted"
    assert run["checkpoint_id"]
    messages = httpx.get(f"{url}/threads/{thread_id}/state").json()["values"]["messages"]
    assert [m["type"] for m in messages] == ["human", "ai"]
    assert messages[1]["additional_kwargs"] == {"cancelled": True}
    partial: str = messages[1]["content"]
    full = reply_text([HumanMessage("hi")], REPLY_WORDS)
    assert partial and full.startswith(partial) and len(partial) < len(full)
    return partial


def test_only_the_install_and_test_commands_are_not_run() -> None:
    skipped = blocks(README, "sh", skipped=True) + blocks(CLIENTS, "sh", skipped=True)
    skipped += blocks(README, "python", skipped=True) + blocks(CLIENTS, "python", skipped=True)
    assert [b.strip() for b in skipped] == ["pip install -e . && tokenrelay dev", "./scripts/test"]


def test_readme_walk_through(dev: str, tmp_path: Path) -> None:
    port = int(dev.rsplit(":", 1)[1])
    script = on_port("\n".join(blocks(README, "sh")), port)
    assert "cancel?wait=1&action=interrupt" in script and "last_event_id=-1" in script
    out = run_code(["bash"], script, tmp_path).stdout

    location = next(
        line.split(" ", 1)[1].strip()
        for line in (tmp_path / "headers.txt").read_text().splitlines()
        if line.lower().startswith("location:")
    )
    _, _, thread_id, _, run_id, _ = location.split("/")
    partial = assert_stopped_with_partial(dev, thread_id, run_id)
    # The last block replays the whole run, from its metadata to the saved state.
    replay = out[out.rindex("event: metadata") :]
    assert replay.rstrip().splitlines()[-3] == "event: values"
    assert partial in replay.rstrip().splitlines()[-2]


def test_clients_python_snippet(dev: str, tmp_path: Path) -> None:
    port = int(dev.rsplit(":", 1)[1])
    (code,) = blocks(CLIENTS, "python")
    out = run_code([sys.executable, "-"], on_port(code, port), tmp_path).stdout
    status, checkpoint_id, partial = out.rstrip("\n").split(" ", 2)
    assert status == "interrupted" and checkpoint_id
    threads = httpx.post(f"{dev}/threads/search", json={"limit": 100}).json()
    matches = []
    for thread in threads:
        for run in httpx.get(f"{dev}/threads/{thread['thread_id']}/runs").json():
            if run["checkpoint_id"] == checkpoint_id:
                matches.append((thread["thread_id"], run["run_id"]))
    ((thread_id, run_id),) = matches
    assert assert_stopped_with_partial(dev, thread_id, run_id) == partial
