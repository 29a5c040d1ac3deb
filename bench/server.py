"""`tokenrelay dev` in its own process on a throwaway Redis, for benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from tokenrelay.broker.embedded import EmbeddedRedis, free_port


@contextlib.contextmanager
def dev_server(**env: str) -> Iterator[tuple[str, str]]:
    """(API URL, Redis URL) of a `tokenrelay dev` run with extra `TOKENRELAY_*` settings."""
    redis = EmbeddedRedis().start()
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    child_env.update(TOKENRELAY_REDIS_URL=redis.url, TOKENRELAY_LOG_LEVEL="warning", **env)
    server = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)],
        env=child_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/ok").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, redis.url
    finally:
        server.terminate()
        server.wait(timeout=30)
        redis.close()
