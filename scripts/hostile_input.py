"""Send hostile input to a running tokenrelay and print what it answers (docs/security.md).

    python scripts/hostile_input.py http://127.0.0.1:2024 [connections]

Start the server with an `agent` assistant (`tokenrelay dev` has one) and a connection cap under
the number of connections held (TOKENRELAY_MAX_OPEN_CONNECTIONS=900 for the default 1000). It
creates a few threads.
"""

from __future__ import annotations

import socket
import sys
import time

import httpx

JSON = {"content-type": "application/json"}
CHAT = [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]


def show(name: str, r: httpx.Response) -> None:
    print(f"{name}: {r.status_code} ({len(r.content)} bytes) {r.text[:110]!r}")


def main(url: str, connections: int) -> None:
    c = httpx.Client(base_url=url, timeout=60)
    big = b'{"metadata":{"a":"' + b"x" * 50_000_000 + b'"}}'
    show("POST /threads with 50 MB of metadata", c.post("/threads", content=big, headers=JSON))
    tid = c.post("/threads", json={}).json()["thread_id"]
    huge_input = {"messages": [{"role": "user", "content": "y" * 20_000_000}]}
    run = {"assistant_id": "agent", "input": huge_input}
    show("a run with a 20 MB input", c.post(f"/threads/{tid}/runs", json=run))
    show("a 5 MB body of the wrong type", c.post("/threads", json={"metadata": "z" * 5_000_000}))
    deep = b'{"metadata":' + b'{"a":' * 100 + b"1" + b"}" * 101
    show("JSON nested 100 deep", c.post("/threads", content=deep, headers=JSON))
    surrogate = b'{"metadata":{"a":"\\ud800"}}'
    show("a lone surrogate in metadata", c.post("/threads", content=surrogate, headers=JSON))
    bad_node = {"values": {}, "as_node": "nope"}
    show("a state update as node 'nope'", c.post(f"/threads/{tid}/state", json=bad_node))
    create = {"assistant_id": "agent", "if_not_exists": "create"}
    ids = [("10,000-character", "i" * 10_000), ("newline", "a%0Ab"), ("'..'", "%2E%2E")]
    for name, path in ids:
        show(f"a run creating a thread, {name} id", c.post(f"/threads/{path}/runs", json=create))
    show("/ai/chat, id with a newline", c.post("/ai/chat", json={"id": "a\nb", "messages": CHAT}))
    show("OPTIONS /threads/count", c.request("OPTIONS", "/threads/count"))

    host, port = httpx.URL(url).host, httpx.URL(url).port or 80
    held = []
    for _ in range(connections):
        sock = socket.create_connection((host, port))
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
        held.append(sock)
    time.sleep(0.5)
    fresh = httpx.Client(base_url=url, timeout=60)
    held_note = f"{connections} partial-header connections"
    show(f"{held_note}: GET /healthz", fresh.get("/healthz"))
    show(f"{held_note}: POST /threads", fresh.post("/threads", json={}))
    start = time.monotonic()
    closed = 0
    for sock in held:
        sock.settimeout(60)
        try:
            closed += sock.recv(1) == b""
        except OSError:
            closed += 1
        sock.close()
    print(f"closed by the server: {closed}/{connections} after {time.monotonic() - start:.1f} s")
    show("then POST /threads", httpx.Client(base_url=url, timeout=60).post("/threads", json={}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
