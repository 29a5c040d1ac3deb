"""The `tokenrelay` command line documents itself."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
