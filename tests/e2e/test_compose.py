"""compose.yaml holds together (validated structurally: no compose plugin or engine here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_services_replicas_and_health() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "postgres", "api", "worker", "nginx"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["TOKENRELAY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["TOKENRELAY_CHECKPOINTER"].startswith("postgresql://")
        assert services[name]["image"] == "tokenrelay:latest"
    # the drain gets its grace period before compose kills a worker
    worker = services["worker"]
    grace = int(worker["environment"]["TOKENRELAY_SHUTDOWN_GRACE_SECONDS"])
    assert int(worker["stop_grace_period"].rstrip("s")) > grace
    # a process that dies (Redis or Postgres not ready yet, a crash) comes back by itself
    assert all(svc["restart"] == "unless-stopped" for svc in services.values())


def test_nginx_uses_the_shipped_sse_config() -> None:
    nginx = compose()["services"]["nginx"]
    mount = nginx["volumes"][0].split(":")
    assert (ROOT / mount[0]).resolve() == (ROOT / "deploy/nginx/tokenrelay.conf").resolve()
    conf = (ROOT / mount[0]).read_text()
    for line in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_read_timeout 3600s;"):
        assert line in conf
    assert "server api:2024" in conf


def test_dockerfile_runs_as_non_root_and_serves_both_commands() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER tokenrelay" in text
    assert "COPY tokenrelay ./tokenrelay" in text
    worker_cmd = compose()["services"]["worker"]["command"]
    assert worker_cmd == ["tokenrelay", "worker"]
