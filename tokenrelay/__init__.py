"""tokenrelay: a resumable-stream broker for LLM agents.

The distribution's one top-level package: the Redis side (`tokenrelay.broker`), the worker and the
CLI (`tokenrelay.producer`) and the HTTP side (`tokenrelay.api`).
"""
