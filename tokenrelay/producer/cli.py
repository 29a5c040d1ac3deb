"""The ``tokenrelay`` command: ``api``, ``worker`` and ``dev``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from prometheus_client import start_http_server

from tokenrelay.broker.connection import connect
from tokenrelay.broker.embedded import EmbeddedRedis, die_with_parent
from tokenrelay.broker.errors import GraphLoadError
from tokenrelay.broker.graphs import GraphRegistry, import_object, open_checkpointer
from tokenrelay.broker.project import find_project
from tokenrelay.broker.runtime import settle_heap, usable_cores
from tokenrelay.broker.settings import Settings, get_settings
from tokenrelay.broker.telemetry import setup_logging
from tokenrelay.producer.worker import Worker

# The API is loaded by import string: this package never imports `api`.
APP_FACTORY = "tokenrelay.api.app:create_app"

log = logging.getLogger("tokenrelay")

MICRO_BENCHMARKS = ("roundtrips", "cancel", "storage")


def _limits(settings: Settings) -> dict[str, Any]:
    """uvicorn options for the API's limits (the protocol by name: the CLI imports no `api`)."""
    return {
        "http": "tokenrelay.api.serving:GuardedHttpTools",
        "loop": "tokenrelay.api.serving:Loop",
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "ws_max_size": settings.max_body_bytes,
    }


def _check_graphs(settings: Settings, *, serving: bool = False) -> None:
    """Import every configured graph now (and, for the API, the project's auth object and
    app), so a wrong spec fails at start, naming it."""
    try:
        GraphRegistry(settings.graphs, None).load_all()
        if serving and settings.auth:
            import_object(settings.auth, "auth path")
        if serving and settings.http_app:
            import_object(settings.http_app, "http.app")
    except GraphLoadError as exc:
        sys.exit(f"tokenrelay: {exc}")


def _load_project(config: str | None) -> None:
    """Apply `config` (or ./langgraph.json when present) to this process's environment, before
    the settings are read: its keys fill the TOKENRELAY_* settings that are not already set."""
    try:
        project = find_project(config)
    except GraphLoadError as exc:
        sys.exit(f"tokenrelay: {exc}")
    if project is not None:
        project.apply()
        get_settings.cache_clear()


def _signals(stop: asyncio.Event, force: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: drain. Second: stop at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: stopping now")
            force.set()
        else:
            log.info("signal received: draining (send again to stop now)")
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)


async def _serve_worker(settings: Settings, concurrency: int | None) -> None:
    stop, force = asyncio.Event(), asyncio.Event()
    _signals(stop, force)
    async with open_checkpointer(settings.checkpointer) as saver:
        registry = GraphRegistry(settings.graphs, saver)
        registry.load_all()
        settle_heap()
        redis = connect(settings.resolved_redis_url(), cluster=settings.redis_cluster)
        worker = Worker(redis, settings, registry, concurrency=concurrency)
        try:
            await worker.serve(stop, force)
        finally:
            await redis.aclose()


def _bind(host: str, port: int) -> socket.socket:
    """The dev server's listening socket, bound before anything else starts or prints; a port
    in use ends the command at once with one line that says so."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        sys.exit(
            f"tokenrelay dev: cannot listen on {host}:{port} ({exc.strerror}); "
            "pick another port with --port"
        )
    return sock


def _child(args: list[str], env: dict[str, str], pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:  # fmt: skip
    """A `tokenrelay` subcommand in a process of its own that dies with this one."""
    return subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.producer.cli", *args],
        env=env,
        pass_fds=pass_fds,
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )


def _supervise(children: list[subprocess.Popen[bytes]], grace: float) -> int:
    """Wait until a signal comes or a child exits, then stop them all (SIGTERM, then SIGKILL
    after `grace` seconds); returns the exit status of the first child that ended."""
    # The handler only appends to a list: a handler runs in the main thread between two of its
    # bytecodes, so one that took a lock (a threading.Event's) would deadlock when a second
    # signal came while the first held it (`timeout` signals the process and its group at once).
    received: list[int] = []
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {
        sig: signal.signal(sig, lambda signum, _: received.append(signum)) for sig in signals
    }
    status = 0
    try:
        while not received:
            ended = next((c for c in children if c.poll() is not None), None)
            if ended is not None:
                status = ended.returncode or 0
                if status:
                    log.error("a child process exited with %s; stopping the others", status)
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _shares_state(checkpointer: str) -> bool:
    """Whether several processes see the same threads through this checkpointer."""
    return checkpointer != "memory"


def _processes(requested: int | None, settings: Settings, what: str) -> int:
    """How many processes to run: as asked, else one per core when the checkpointer is
    shared (an in-memory one lives in a single process); cores as a container's CPU limit
    allows."""
    if requested is not None:
        return requested
    if not _shares_state(settings.checkpointer):
        log.info("one %s process: TOKENRELAY_CHECKPOINTER=memory is not shared", what)
        return 1
    return usable_cores()


def _dev(settings: Settings, sock: socket.socket, log_args: list[str], extra: list[str]) -> int:
    """The API and the worker(s) as processes of their own on one Redis and one checkpointer."""
    host, port = sock.getsockname()[:2]
    env = {**os.environ, "TOKENRELAY_REDIS_URL": settings.resolved_redis_url()}
    scratch: str | None = None
    if not _shares_state(settings.checkpointer):
        # A throwaway SQLite file: the API and the workers see the same threads.
        scratch = tempfile.mkdtemp(prefix="tokenrelay-dev-")
        env["TOKENRELAY_CHECKPOINTER"] = f"sqlite:///{scratch}/checkpoints.sqlite"
    # A worker per core, the API beside them: a worker costs about twice the API's CPU per token
    # (the graph runs there), and the kernel shares the cores out by what each process needs.
    workers = usable_cores()
    url = f"http://{host}:{port}"
    print(
        f"\ntokenrelay dev: {url}  (Redis {settings.resolved_redis_url()}, graphs "
        f"{', '.join(settings.graphs)}; 1 API process, {workers} worker process"
        f"{'es' if workers > 1 else ''})\n\n"
        f"  curl -s -X POST {url}/threads -H 'Content-Type: application/json' -d '{{}}'\n"
        f"  curl -N -X POST {url}/threads/<thread_id>/runs/stream "
        "-H 'Content-Type: application/json' \\\n"
        '       -d \'{"assistant_id": "agent", "input": {"messages": [{"role": "user", '
        '"content": "hi"}]}, "stream_mode": ["messages-tuple", "values"]}\'\n',
        flush=True,
    )
    fd = sock.fileno()
    api = [*log_args, "api", "--fd", str(fd), "--workers", "1", *extra]
    children = [_child(api, env, [fd])]
    worker = [*log_args, "worker", "--processes", "1", *extra]
    children += [_child(worker, env) for _ in range(workers)]
    try:
        return _supervise(children, grace=10)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="the project's langgraph.json (default: ./langgraph.json when there is one)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line: global options, then one subcommand and its options."""
    parser = argparse.ArgumentParser(prog="tokenrelay", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("TOKENRELAY_LOG_LEVEL", "info"),
        help="debug, info, warning or error (default: $TOKENRELAY_LOG_LEVEL or info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("TOKENRELAY_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per line (default: $TOKENRELAY_LOG_FORMAT or text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_api = sub.add_parser("api", help="run the HTTP API")
    p_api.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p_api.add_argument("--port", type=int, default=2024, help="port to listen on (%(default)s)")
    p_api.add_argument(
        "--workers", type=int, default=None,
        help="API processes (default: one per core, or 1 with TOKENRELAY_CHECKPOINTER=memory)",
    )  # fmt: skip
    p_api.add_argument(
        "--fd", type=int, default=None,
        help="serve on this inherited listening socket instead of --host/--port "
        "(how tokenrelay dev hands its socket to the API process)",
    )  # fmt: skip
    _add_config(p_api)

    p_worker = sub.add_parser("worker", help="run a producer worker")
    p_worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="runs this process executes at once (default: sized for I/O-bound LLM runs)",
    )
    p_worker.add_argument(
        "--processes", type=int, default=None,
        help="worker processes (default: one per core, or 1 with TOKENRELAY_CHECKPOINTER=memory)",
    )  # fmt: skip
    p_worker.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    _add_config(p_worker)

    p_dev = sub.add_parser(
        "dev", help="API and worker processes, the demo graph (or yours), a throwaway Redis"
    )
    p_dev.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    p_dev.add_argument(
        "--port", type=int, default=2024, help="port to listen on (%(default)s); pick another "
        "when it is taken",
    )  # fmt: skip
    _add_config(p_dev)

    sub.add_parser(
        "bench",
        help="the side-by-side benchmark suite (`--quick` for a smoke check), or one of "
        f"{', '.join(MICRO_BENCHMARKS)}; see docs/benchmarks.md",
        add_help=False,
    )
    return parser


def _bench_module(name: str) -> Any:
    """`bench` is a tool of the source checkout, not part of the distribution: it is found beside
    the installed package (an editable install) or on the path (run from the checkout's root)."""
    checkout = Path(__file__).resolve().parent.parent.parent
    if (checkout / "bench" / "suite.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", f"bench.{name}"):
            raise
        sys.exit(
            "tokenrelay bench runs from a source checkout (it needs the benchmark's Node peer and "
            "writes docs/benchmarks.md): git clone the project, `pip install -e '.[dev]'` in it, "
            "and run `tokenrelay bench` there"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(args.log_level, args.log_format)
    sock = _bind(args.host, args.port) if args.command == "dev" else None
    if args.command in ("api", "worker", "dev"):
        _load_project(args.config)
        # One stream token secret for all of this command's API processes (uvicorn workers).
        os.environ.setdefault("TOKENRELAY_STREAM_TOKEN_SECRET", secrets.token_urlsafe(32))
    settings = get_settings()

    log_args = ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.command == "api":
        _check_graphs(settings, serving=True)
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=args.host,
            port=args.port,
            fd=args.fd,
            workers=_processes(args.workers, settings, "API"),
            log_level=args.log_level.lower(),
            timeout_graceful_shutdown=5,
            **_limits(settings),
        )
    elif args.command == "worker":
        _check_graphs(settings)
        processes = _processes(args.processes, settings, "worker")
        if processes > 1:
            extra = ["--concurrency", str(args.concurrency)] if args.concurrency else []
            worker = [*log_args, "worker", "--processes", "1", *extra]
            sys.exit(_supervise([_child(worker, dict(os.environ)) for _ in range(processes)],
                                grace=settings.shutdown_grace_seconds + 5))  # fmt: skip
        if args.metrics_port:
            start_http_server(args.metrics_port)
        uvloop.run(_serve_worker(settings, args.concurrency))
    elif args.command == "bench":
        name = rest[0] if rest and rest[0] in MICRO_BENCHMARKS else "suite"
        if name != "suite":
            rest = rest[1:]
        module = _bench_module(name)
        sys.argv = [f"tokenrelay bench {'' if name == 'suite' else name}".rstrip(), *rest]
        module.main()
    elif args.command == "dev":
        assert sock is not None
        _check_graphs(settings, serving=True)
        embedded: EmbeddedRedis | None = None
        status = 0
        try:
            if not settings.redis_url:
                try:
                    embedded = EmbeddedRedis().start()
                except RuntimeError as exc:
                    sys.exit(f"tokenrelay dev: {exc}")
                os.environ["TOKENRELAY_REDIS_URL"] = embedded.url
                get_settings.cache_clear()
            config = ["--config", str(Path(args.config).resolve())] if args.config else []
            status = _dev(get_settings(), sock, log_args, config)
        finally:
            sock.close()
            if embedded is not None:
                embedded.close()
        sys.exit(status)


if __name__ == "__main__":
    main()
