"""Fault-injection tests: the fixtures of the worker tests (an API, worker processes on demand,
the Postgres checkpointer), so each fault is injected into the real processes."""

from tests.integration.test_worker import api, client, settings, workers

__all__ = ["api", "client", "settings", "workers"]
