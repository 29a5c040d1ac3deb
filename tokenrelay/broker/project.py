"""A LangGraph project's ``langgraph.json``, read as ``langgraph dev`` reads it.

The CLI applies it to its own environment before the settings are read, so each key becomes
the ``TOKENRELAY_*`` setting it stands for unless that setting is already set (which wins), and
every process the CLI starts (uvicorn workers included) sees the same configuration.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenrelay.broker.errors import GraphLoadError

log = logging.getLogger("tokenrelay.project")

CONFIG_FILE = "langgraph.json"
SUPPORTED_KEYS = frozenset({"graphs", "env", "dependencies", "auth", "http"})
QUIET_KEYS = frozenset({"$schema"})
SUPPORTED_AUTH_KEYS = frozenset({"path"})
SUPPORTED_HTTP_KEYS = frozenset({"app", "enable_custom_route_auth"})


@dataclass(slots=True)
class Project:
    """What tokenrelay uses of a ``langgraph.json``, with paths made absolute."""

    root: Path
    graphs: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    dependencies: list[Path] = field(default_factory=list)
    auth: str | None = None
    http_app: str | None = None
    http_app_auth: bool = False
    unsupported: list[str] = field(default_factory=list)

    def apply(self, environ: MutableMapping[str, str] = os.environ) -> None:
        """Put the project into `environ` and `sys.path`; a variable already set wins."""
        for path in reversed(self.dependencies):
            if str(path) not in sys.path:
                sys.path.insert(0, str(path))
        for name, value in self.env.items():
            environ.setdefault(name, value)
        if self.graphs:
            environ.setdefault("TOKENRELAY_GRAPHS", json.dumps(self.graphs))
        if self.auth:
            environ.setdefault("TOKENRELAY_AUTH", self.auth)
        if self.http_app:
            environ.setdefault("TOKENRELAY_HTTP_APP", self.http_app)
        if self.http_app_auth:
            environ.setdefault("TOKENRELAY_HTTP_APP_AUTH", "true")
        if self.unsupported:
            log.warning(
                "%s: not supported by tokenrelay, ignored: %s",
                self.root / CONFIG_FILE,
                ", ".join(self.unsupported),
            )


def _spec(root: Path, spec: str) -> str:
    """A ``file.py:attr`` spec made absolute against the config's folder; a module spec as is."""
    target, sep, attr = spec.rpartition(":")
    if not sep:
        return spec
    if target.endswith(".py") or "/" in target:
        return f"{(root / target).resolve()}:{attr}"
    return spec


def _env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (``export`` and quotes allowed, ``#`` comments skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[name.strip()] = value
    return out


def read_project(config: Path) -> Project:
    """Read `config`; a missing file, bad JSON or a wrongly typed key raises GraphLoadError."""
    try:
        raw: Any = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise GraphLoadError(f"{config}: {exc}") from exc
    if not isinstance(raw, dict):
        raise GraphLoadError(f"{config}: a JSON object is expected")
    root = config.resolve().parent
    project = Project(root=root)
    project.unsupported = sorted(k for k in raw if k not in SUPPORTED_KEYS | QUIET_KEYS)

    graphs = raw.get("graphs") or {}
    if not isinstance(graphs, dict):
        raise GraphLoadError(f"{config}: `graphs` must map graph ids to specs")
    for graph_id, spec in graphs.items():
        if isinstance(spec, dict):  # {"path": ..., "description": ...}
            spec = spec.get("path")
        if not isinstance(spec, str):
            raise GraphLoadError(f"{config}: graph {graph_id!r} needs a 'module:attr' spec")
        project.graphs[graph_id] = _spec(root, spec)

    env = raw.get("env")
    if isinstance(env, str):
        try:
            project.env = _env_file(root / env)
        except OSError as exc:
            raise GraphLoadError(f"{config}: `env` file: {exc}") from exc
    elif isinstance(env, dict):
        project.env = {str(k): str(v) for k, v in env.items()}
    elif env is not None:
        raise GraphLoadError(f"{config}: `env` must be an object or an env file path")

    deps = raw.get("dependencies") or []
    if not isinstance(deps, list):
        raise GraphLoadError(f"{config}: `dependencies` must be a list")
    for dep in deps:
        path = (root / str(dep)).resolve()
        if path.is_dir():  # a local package; PyPI requirements are installed beforehand
            project.dependencies.append(path)

    auth = raw.get("auth")
    if isinstance(auth, dict):
        if isinstance(auth.get("path"), str):
            project.auth = _spec(root, auth["path"])
        project.unsupported += [f"auth.{k}" for k in sorted(auth) if k not in SUPPORTED_AUTH_KEYS]
    elif auth is not None:
        raise GraphLoadError(f"{config}: `auth` must be an object with a `path`")

    http = raw.get("http")
    if isinstance(http, dict):
        if isinstance(http.get("app"), str):
            project.http_app = _spec(root, http["app"])
        project.http_app_auth = http.get("enable_custom_route_auth") is True
        project.unsupported += [f"http.{k}" for k in sorted(http) if k not in SUPPORTED_HTTP_KEYS]
    elif http is not None:
        raise GraphLoadError(f"{config}: `http` must be an object")
    return project


def find_project(config: str | None, cwd: Path | None = None) -> Project | None:
    """The project named by `config` (which must exist), else ``langgraph.json`` in `cwd`."""
    if config is not None:
        return read_project(Path(config))
    candidate = (cwd or Path.cwd()) / CONFIG_FILE
    return read_project(candidate) if candidate.is_file() else None
