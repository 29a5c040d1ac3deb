"""The `tokenrelay` command line documents itself."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenrelay.broker.runtime import usable_cores
from tokenrelay.producer.cli import build_parser


def test_every_option_has_help_text() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = {"tokenrelay": parser} | {f"tokenrelay {n}": p for n, p in sub.choices.items()}
    undocumented = [
        f"{name} {action.option_strings[-1]}"
        for name, command in commands.items()
        for action in command._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []
    assert {"tokenrelay api", "tokenrelay worker", "tokenrelay dev"} <= set(commands)


def test_usable_cores_follow_a_container_cpu_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path)) == affinity  # no cgroup file: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: one process
    assert usable_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text(f"{150000 * affinity} 100000\n")  # above the affinity
    assert usable_cores(str(tmp_path)) == affinity
    (tmp_path / "cpu.max").write_text("garbage")
    assert usable_cores(str(tmp_path)) == affinity


SUPERVISED = """
import subprocess, sys
from tokenrelay.producer.cli import _supervise
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
sys.exit(_supervise([child], 2.0))
"""


def test_a_burst_of_signals_stops_the_supervisor_and_its_children() -> None:
    """`tokenrelay dev`'s supervisor stops on a signal however many come at once (`timeout`
    signals the process and its group; an impatient user presses Ctrl-C twice): its handler
    takes no lock that a second signal, handled inside the first, would wait on for ever."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISED], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        time.sleep(0.3)  # the handlers are installed
        for i in range(200):
            os.kill(proc.pid, signal.SIGINT if i % 2 else signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # stopped and reaped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
