"""The `tokenrelay` command line documents itself."""

from __future__ import annotations

import argparse

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
