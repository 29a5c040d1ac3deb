"""The ``tokenrelay`` command: ``api``, ``worker`` and ``dev``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvicorn

from broker.connection import connect
from broker.embedded import EmbeddedRedis
from broker.errors import GraphLoadError
from broker.graphs import shared_registry
from broker.settings import Settings, get_settings
from producer.worker import Worker

# The API is loaded by import string: this package never imports `api`.
APP_FACTORY = "api.app:create_app"

log = logging.getLogger("tokenrelay")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _registry(settings: Settings) -> object:
    try:
        return shared_registry(json.dumps(settings.graphs, sort_keys=True), settings.checkpointer)
    except GraphLoadError as exc:
        sys.exit(f"tokenrelay: {exc}")


async def _serve_worker(settings: Settings, concurrency: int | None) -> None:
    registry = _registry(settings)
    redis = connect(settings.resolved_redis_url())
    worker = Worker(redis, settings, registry, concurrency=concurrency)  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.serve(stop)
    finally:
        await redis.aclose()


async def _serve_dev(settings: Settings, host: str, port: int) -> None:
    registry = _registry(settings)
    redis = connect(settings.resolved_redis_url())
    worker = Worker(redis, settings, registry)  # type: ignore[arg-type]
    stop = asyncio.Event()
    worker_task = asyncio.create_task(worker.serve(stop))
    config = uvicorn.Config(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=3,
    )
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
        await server.serve()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(worker_task, 5)
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenrelay", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TOKENRELAY_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    p_api = sub.add_parser("api", help="run the HTTP API")
    p_api.add_argument("--host", default="127.0.0.1")
    p_api.add_argument("--port", type=int, default=2024)
    p_api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")

    p_worker = sub.add_parser("worker", help="run a producer worker")
    p_worker.add_argument("--concurrency", type=int, default=None)

    p_dev = sub.add_parser(
        "dev", help="API + worker + demo graph (+ embedded Redis) in one process"
    )
    p_dev.add_argument("--host", default="127.0.0.1")
    p_dev.add_argument("--port", type=int, default=2024)

    args = parser.parse_args(argv)
    _setup_logging(args.log_level)

    if args.command == "api":
        settings = get_settings()
        _registry(settings)
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
        asyncio.run(_serve_worker(get_settings(), args.concurrency))
    elif args.command == "dev":
        embedded: EmbeddedRedis | None = None
        if not os.environ.get("TOKENRELAY_REDIS_URL"):
            embedded = EmbeddedRedis().start()
            os.environ["TOKENRELAY_REDIS_URL"] = embedded.url
            get_settings.cache_clear()
        try:
            asyncio.run(_serve_dev(get_settings(), args.host, args.port))
        except KeyboardInterrupt:
            pass
        finally:
            if embedded is not None:
                embedded.stop()


if __name__ == "__main__":
    main()
