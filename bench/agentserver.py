"""The official Agent Server (`langgraph dev`) as a benchmark peer, in a virtualenv of its own.

The virtualenv is created once under the cache directory (`pip install 'langgraph-cli[inmem]'`)
and reused; it serves the same demo chat graph as `tokenrelay dev`
(`tokenrelay/producer/demo.py:graph`) from a `langgraph.json` written to a temporary directory.

    python -m bench.agentserver        # create (or check) the virtualenv, print its path
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenrelay-bench"
VENV = CACHE / "langgraph-venv"
REQUIREMENTS = ("langgraph-cli[inmem]", "pydantic-settings")
"""The server, and what the demo graph imports besides LangChain (`tokenrelay.broker.settings`)."""
READY = VENV / ".tokenrelay-ready"
"""Lists what was installed once the install finished, so a half-made virtualenv is never
used."""


def langgraph() -> Path:
    return VENV / "bin" / "langgraph"


def ensure_venv(timeout: float = 900) -> str | None:
    """Create the virtualenv if needed; None when `langgraph` is ready, else why not."""
    try:
        return _ensure_venv(timeout)
    except OSError as exc:
        return f"could not create {VENV}: {exc}"


def _ensure_venv(timeout: float) -> str | None:
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if READY.exists() and READY.read_text() == wanted and langgraph().exists():
        return None
    steps = [[str(VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
              *REQUIREMENTS]]  # fmt: skip
    if not (VENV / "bin" / "pip").exists():
        shutil.rmtree(VENV, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        steps.insert(0, [sys.executable, "-m", "venv", str(VENV)])
    READY.unlink(missing_ok=True)
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not create {VENV} ({' '.join(step[:3])}): {exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"could not create {VENV} ({' '.join(step[:3])}): {' / '.join(tail)}"
    if not langgraph().exists():
        return f"{REQUIREMENTS[0]} installed no `langgraph` command in {VENV}"
    READY.write_text(wanted)
    return None


def project(directory: Path) -> Path:
    """A `langgraph.json` serving the demo graph as assistant `agent`, as `tokenrelay dev` does."""
    config = {
        "dependencies": [str(ROOT)],
        "graphs": {"agent": f"{ROOT / 'tokenrelay' / 'producer' / 'demo.py'}:graph"},
    }
    path = directory / "langgraph.json"
    path.write_text(json.dumps(config))
    return path


def command(config: Path, port: int, jobs: int) -> list[str]:
    return [
        str(langgraph()), "dev", "--config", str(config), "--no-browser", "--no-reload",
        "--host", "127.0.0.1", "--port", str(port), "--n-jobs-per-worker", str(jobs),
    ]  # fmt: skip


if __name__ == "__main__":
    why = ensure_venv()
    print(why or VENV)
    sys.exit(1 if why else 0)
