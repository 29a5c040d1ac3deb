"""Screenshots of the console for the docs: starts `tokenrelay dev` from this checkout on a free
port, drives the console in headless Chromium (Debian's /usr/bin/chromium, through Playwright)
and writes docs/img/console-*.png.

    python scripts/console_screenshots.py

Steps: a few finished threads, then a reply streaming, the connection dropped and resumed, a
reply stopped with its checkpoint, the threads sidebar (renaming one, another run live), and the
metrics while several runs stream.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 760}
# Slow enough that every step catches its run live.
DEMO = {"TOKENRELAY_DEMO_REPLY_WORDS": "160", "TOKENRELAY_DEMO_TOKEN_DELAY_MS": "70"}
LIMIT_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def dev_server() -> Iterator[str]:
    """`tokenrelay dev` of this checkout (not whatever is installed) until the block ends."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env.update(DEMO, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    args = [sys.executable, "-m", "tokenrelay.producer.cli", "dev", "--port", str(port)]
    proc = subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("tokenrelay dev did not start")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def seed_threads(url: str) -> None:
    """A few finished conversations, so the sidebar looks like a used one."""
    runs = []
    for title, prompt in [
        ("Deploy behind nginx", "How do I deploy behind nginx?"),
        ("Serverless time limits", "What happens at a serverless time limit?"),
        ("Redis Cluster slots", "Why hash tags?"),
    ]:
        tid = httpx.post(f"{url}/threads", json={"metadata": {"title": title}}).json()["thread_id"]
        body = {
            "assistant_id": "agent",
            "input": {"messages": [{"role": "user", "content": prompt}]},
        }
        runs.append((tid, httpx.post(f"{url}/threads/{tid}/runs", json=body).json()["run_id"]))
    for tid, rid in runs:
        httpx.get(f"{url}/threads/{tid}/runs/{rid}/join", timeout=120)


def stream_a_run(url: str, i: int) -> None:
    """A run on a thread of its own, streamed to the end (load for the metrics)."""
    tid = httpx.post(f"{url}/threads", json={"metadata": {"title": f"load {i}"}}).json()
    body = {
        "assistant_id": "agent",
        "input": {"messages": [{"role": "user", "content": f"load {i}"}]},
        "stream_mode": ["messages-tuple"],
    }
    stream = f"{url}/threads/{tid['thread_id']}/runs/stream"
    with httpx.stream("POST", stream, json=body, timeout=120) as r:
        for _ in r.iter_bytes():
            pass


def wait_status(page: Page, *labels: str) -> None:
    page.wait_for_function(
        "labels => labels.includes(document.getElementById('status').textContent)",
        arg=list(labels),
        timeout=LIMIT_MS,
    )


def wait_tokens(page: Page, n: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.live .tok').length >= n", arg=n, timeout=LIMIT_MS
    )


def shoot(page: Page, name: str) -> None:
    path = OUT / f"console-{name}.png"
    page.screenshot(path=str(path))
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with dev_server() as url, sync_playwright() as p:
        seed_threads(url)
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
        page.goto(url)
        page.wait_for_selector("#send:enabled")

        # A reply streaming, its event ids shown.
        page.fill("#prompt", "Tell me about resumable streams")
        page.click("#send")
        wait_tokens(page, 40)
        page.check("#show-ids")
        shoot(page, "streaming")
        page.uncheck("#show-ids")

        # Drop the connection: the page reports what it missed and how the resume went.
        page.click("#drop")
        page.locator(".card.resume").filter(has_text="no gap").wait_for(timeout=LIMIT_MS)
        wait_tokens(page, 100)
        shoot(page, "resumed")
        wait_status(page, "done")

        # Stop a reply: the partial reply stays, with its checkpoint and a branch button.
        page.fill("#prompt", "And what does Stop keep?")
        page.click("#send")
        wait_tokens(page, 35)
        page.click("#stop")
        wait_status(page, "interrupted")
        shoot(page, "stopped")

        # The sidebar: a run live on another thread, and a thread being renamed.
        page.click("#new-thread")
        page.fill("#prompt", "Stream while I look elsewhere")
        page.click("#send:enabled")
        wait_tokens(page, 10)
        first = page.locator("#thread-list li").nth(1)
        first.click()
        wait_status(page, "interrupted")
        item = page.locator("#thread-list li.current")
        item.hover()
        item.locator(".rename").click()
        item.locator("input").fill("What Stop keeps")
        shoot(page, "threads")
        item.locator("input").press("Enter")

        # Metrics while several runs stream at once, each to a reader of its own.
        readers = [threading.Thread(target=stream_a_run, args=(url, i)) for i in range(6)]
        for reader in readers:
            reader.start()
        page.fill("#prompt", "Branch off: what does a resume cost?")
        page.click("#branch")
        wait_tokens(page, 100)  # the chart climbs, then holds
        shoot(page, "metrics")
        for reader in readers:
            reader.join()
        browser.close()


if __name__ == "__main__":
    main()
