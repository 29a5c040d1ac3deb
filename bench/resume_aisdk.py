"""An AI SDK chat resumed mid-reply: how long `GET /ai/chat/{id}/stream` takes to catch up.

Starts `tokenrelay dev` with a long demo reply streamed fast, lets each chat produce `--behind`
tokens plus a margin, then resumes it as `useChat({resume: true})` does after a refresh and
times the resumed stream to its `--behind`th `text-delta`; also the API process's CPU over that
read and how many chunks the client received.

    python -m bench.resume_aisdk [--behind 8000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import psutil

from tokenrelay.broker.embedded import free_port


def _api(dev_pid: int) -> psutil.Process:
    for proc in psutil.Process(dev_pid).children(recursive=True):
        if " api" in " ".join(proc.cmdline()):
            return proc
    raise RuntimeError("no API process under `tokenrelay dev`")


async def _ready(client: httpx.AsyncClient) -> None:
    for _ in range(600):
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("`tokenrelay dev` did not get ready")


async def _once(client: httpx.AsyncClient, api: psutil.Process, behind: int) -> dict[str, Any]:
    chat = str(uuid.uuid4())
    body = {"id": chat, "messages": [{"id": "u", "role": "user",
                                      "parts": [{"type": "text", "text": "hi"}]}]}  # fmt: skip
    async with client.stream("POST", "/ai/chat", json=body) as r:
        seen = 0
        async for line in r.aiter_lines():
            seen += '"text-delta"' in line
            if seen >= behind + 500:
                break  # the first tab goes away; the reply goes on
    cpu0, t0 = sum(api.cpu_times()[:2]), time.perf_counter()
    deltas = chunks = 0
    async with client.stream("GET", f"/ai/chat/{chat}/stream") as r:
        async for chunk in r.aiter_raw():
            chunks += 1
            deltas += chunk.count(b'"text-delta"')
            if deltas >= behind:
                break
    wall, cpu = time.perf_counter() - t0, sum(api.cpu_times()[:2]) - cpu0
    await client.post(f"/ai/chat/{chat}/stop")
    return {"catch_up_ms": wall * 1000, "api_cpu_ms": cpu * 1000, "chunks": chunks}


async def _measure(port: int, pid: int, behind: int, repeats: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        await _ready(client)
        api = _api(pid)
        for _ in range(repeats):
            r = await _once(client, api, behind)
            print(f"catch-up {r['catch_up_ms']:.1f} ms, API CPU {r['api_cpu_ms']:.0f} ms, "
                  f"{r['chunks']} chunks", flush=True)  # fmt: skip


def main(behind: int, repeats: int) -> None:
    port = free_port()
    env = {**os.environ, "TOKENRELAY_DEMO_REPLY_WORDS": str(5 * behind),
           "TOKENRELAY_DEMO_TOKEN_DELAY_MS": "0.5"}  # fmt: skip
    dev = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        asyncio.run(_measure(port, dev.pid, behind, repeats))
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        dev.wait(60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--behind", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.behind, args.repeats)
