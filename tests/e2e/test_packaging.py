"""The distribution claims one top-level name, carries its data files, and leaves the benchmark
(a tool of the source checkout) out, saying so when it is asked for."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_only_the_tokenrelay_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("tokenrelay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tokenrelay"}
    for needed in (
        "tokenrelay/broker/scripts/append.lua",
        "tokenrelay/api/static/console.html",
        "tokenrelay/api/static/icon.svg",
        "tokenrelay/producer/demo.py",
        "tokenrelay/py.typed",
    ):
        assert needed in names
    assert not any(name.startswith(("bench/", "tests/", "tokenrelay/bench")) for name in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(entry).decode()
    assert "tokenrelay = tokenrelay.producer.cli:main" in entry_points

    # Installed from the wheel (unpacked on the path here), `tokenrelay bench` says where it runs.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    done = subprocess.run(
        [sys.executable, "-c", "from tokenrelay.producer.cli import main; main(['bench'])"],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "runs from a source checkout" in done.stderr
    assert "Traceback" not in done.stderr
