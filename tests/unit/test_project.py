"""`langgraph.json` as `langgraph dev` reads it, applied beneath the TOKENRELAY_* settings."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from tokenrelay.broker.errors import GraphLoadError
from tokenrelay.broker.project import find_project, read_project
from tokenrelay.broker.settings import Settings


def write(root: Path, config: dict[str, object]) -> Path:
    path = root / "langgraph.json"
    path.write_text(json.dumps(config))
    return path


def test_specs_and_paths_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / ".env").write_text("# c\nexport A=\"1\"\nB=two words\n\nC='x=y'\n")
    write(tmp_path, {
        "graphs": {"file": "./src/agent.py:graph", "module": "pkg.graph:make",
                   "described": {"path": "pkg.other:graph", "description": "d"}},
        "dependencies": [".", "./src", "langchain-openai", "./missing"],
        "env": ".env",
        "auth": {"path": "./auth.py:auth"},
        "http": {"app": "./web.py:app", "enable_custom_route_auth": True},
    })  # fmt: skip
    project = read_project(tmp_path / "langgraph.json")
    assert project.graphs == {
        "file": f"{tmp_path / 'src' / 'agent.py'}:graph",
        "module": "pkg.graph:make",
        "described": "pkg.other:graph",
    }
    assert project.dependencies == [tmp_path, tmp_path / "src"]
    assert project.env == {"A": "1", "B": "two words", "C": "x=y"}
    assert project.auth == f"{tmp_path / 'auth.py'}:auth"
    assert project.http_app == f"{tmp_path / 'web.py'}:app"
    assert project.http_app_auth is True
    assert project.unsupported == []


def test_tokenrelay_settings_already_set_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, {
        "graphs": {"agent": "tokenrelay.producer.demo:graph"},
        "env": {"TOKENRELAY_DEMO_REPLY_WORDS": "7", "TOKENRELAY_KEY_PREFIX": "project"},
        "auth": {"path": "./auth.py:auth"},
    })  # fmt: skip
    environ = {
        "TOKENRELAY_KEY_PREFIX": "ops",
        "TOKENRELAY_GRAPHS": '{"x": "tokenrelay.producer.demo:graph"}',
    }
    monkeypatch.setattr(sys, "path", list(sys.path))
    find_project(None, cwd=tmp_path).apply(environ)  # type: ignore[union-attr]
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.key_prefix == "ops"
    assert settings.graphs == {"x": "tokenrelay.producer.demo:graph"}
    assert settings.demo_reply_words == 7
    assert settings.auth == f"{tmp_path / 'auth.py'}:auth"


def test_unsupported_keys_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, {
        "$schema": "https://langgra.ph/schema.json", "graphs": {}, "store": {"index": {}},
        "python_version": "3.12", "auth": {"path": "./a.py:auth", "disable_studio_auth": True},
        "http": {"app": "./w.py:app", "cors": {}},
    })  # fmt: skip
    with caplog.at_level(logging.WARNING, "tokenrelay.project"):
        read_project(path).apply({})
    assert caplog.messages == [
        f"{path}: not supported by tokenrelay, ignored: python_version, store, "
        "auth.disable_studio_auth, http.cors"
    ]


def test_no_config_means_no_project_and_a_named_one_must_exist(tmp_path: Path) -> None:
    assert find_project(None, cwd=tmp_path) is None
    with pytest.raises(GraphLoadError, match=r"nowhere\.json"):
        find_project(str(tmp_path / "nowhere.json"))
    (tmp_path / "bad.json").write_text('{"graphs": ["a"]}')
    with pytest.raises(GraphLoadError, match="`graphs` must map graph ids to specs"):
        find_project(str(tmp_path / "bad.json"))
