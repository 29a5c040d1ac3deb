"""The ``tokenrelay`` command: ``api``, ``worker`` and ``dev``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Sequence

import uvicorn
import uvloop
from prometheus_client import start_http_server

from broker.connection import connect
from broker.embedded import EmbeddedRedis
from broker.errors import GraphLoadError
from broker.graphs import GraphRegistry, import_object, open_checkpointer
from broker.project import find_project
from broker.runtime import settle_heap
from broker.settings import Settings, get_settings
from broker.telemetry import setup_logging
from producer.worker import Worker

# The API is loaded by import string: this package never imports `api`.
APP_FACTORY = "api.app:create_app"

log = logging.getLogger("tokenrelay")

MICRO_BENCHMARKS = ("roundtrips", "cancel", "storage")


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


async def _serve_dev(settings: Settings, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    async with open_checkpointer(settings.checkpointer) as saver:
        redis = connect(settings.resolved_redis_url(), cluster=settings.redis_cluster)
        worker = Worker(redis, settings, GraphRegistry(settings.graphs, saver))
        stop = asyncio.Event()
        worker_task = asyncio.create_task(worker.serve(stop))
        config = uvicorn.Config(
            APP_FACTORY, factory=True, host=host, port=port, log_level="info",
            timeout_graceful_shutdown=3,
        )  # fmt: skip
        server = uvicorn.Server(config)
        url = f"http://{host}:{port}"
        print(
            f"\ntokenrelay dev: {url}  (Redis {settings.resolved_redis_url()}, graphs "
            f"{', '.join(settings.graphs)})\n\n"
            f"  curl -s -X POST {url}/threads -H 'Content-Type: application/json' -d '{{}}'\n"
            f"  curl -N -X POST {url}/threads/<thread_id>/runs/stream "
            "-H 'Content-Type: application/json' \\\n"
            '       -d \'{"assistant_id": "agent", "input": {"messages": [{"role": "user", '
            '"content": "hi"}]}, "stream_mode": ["messages-tuple", "values"]}\'\n',
            flush=True,
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(worker_task, 5)
            await redis.aclose()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


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
        "--workers", type=int, default=1, help="uvicorn worker processes (%(default)s)"
    )
    _add_config(p_api)

    p_worker = sub.add_parser("worker", help="run a producer worker")
    p_worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="runs this process executes at once (default: sized for I/O-bound LLM runs)",
    )
    p_worker.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    _add_config(p_worker)

    p_dev = sub.add_parser("dev", help="API + worker + demo graph (+ Redis) in one process")
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

    if args.command == "api":
        _check_graphs(settings, serving=True)
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level.lower(),
            timeout_graceful_shutdown=5,
        )
    elif args.command == "worker":
        _check_graphs(settings)
        if args.metrics_port:
            start_http_server(args.metrics_port)
        uvloop.run(_serve_worker(settings, args.concurrency))
    elif args.command == "bench":
        name = rest[0] if rest and rest[0] in MICRO_BENCHMARKS else "suite"
        if name != "suite":
            rest = rest[1:]
        module = importlib.import_module(f"bench.{name}")
        sys.argv = [f"tokenrelay bench {'' if name == 'suite' else name}".rstrip(), *rest]
        module.main()
    elif args.command == "dev":
        assert sock is not None
        _check_graphs(settings, serving=True)
        embedded: EmbeddedRedis | None = None
        # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into an exception so the
        # embedded Redis below is stopped instead of the process dying on the spot.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            if not settings.redis_url:
                try:
                    embedded = EmbeddedRedis().start()
                except RuntimeError as exc:
                    sys.exit(f"tokenrelay dev: {exc}")
                os.environ["TOKENRELAY_REDIS_URL"] = embedded.url
                get_settings.cache_clear()
            uvloop.run(_serve_dev(get_settings(), sock))
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
            if embedded is not None:
                embedded.close()


if __name__ == "__main__":
    main()
