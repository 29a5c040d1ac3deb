"""Short-lived signed stream tokens: a browser resumes one thread's (or one run's) stream with
``?stream_token=`` instead of a long-lived secret, so a serverless frontend need not proxy it.

A token is ``<payload>.<signature>``, both base64url: the payload is JSON ``{"t": thread id,
"r": run id or null, "exp": unix seconds, "sub": who asked for it}``, the signature its
HMAC-SHA256 under ``TOKENRELAY_STREAM_TOKEN_SECRET``, checked in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

from tokenrelay.broker.settings import Settings

# Used when no secret is configured: valid only within this process (the CLI sets one secret
# for all the API processes it starts).
_PROCESS_SECRET = secrets.token_bytes(32)


class StreamTokenError(Exception):
    """A stream token that is malformed, badly signed (`expired` False) or past its time."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """What a valid token allows: reading the streams of `thread_id` (only `run_id`'s if set)."""

    thread_id: str
    run_id: str | None
    expires_at: int
    subject: str | None

    def covers(self, thread_id: str, run_id: str | None) -> bool:
        """Whether the stream of `thread_id` (and `run_id`, None: the thread's) is granted."""
        if thread_id != self.thread_id:
            return False
        return self.run_id is None or run_id == self.run_id


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Issues and verifies stream tokens under one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamTokens:
        secret = settings.stream_token_secret
        return cls(secret.encode() if secret else _PROCESS_SECRET)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def issue(
        self, thread_id: str, run_id: str | None, ttl_seconds: int, subject: str | None = None
    ) -> tuple[str, int]:
        """A token for `thread_id` (and `run_id`), and when it expires (unix seconds)."""
        expires_at = int(time.time()) + ttl_seconds
        claims = {"t": thread_id, "r": run_id, "exp": expires_at, "sub": subject}
        payload = _b64(orjson.dumps(claims))
        return f"{payload}.{self._sign(payload)}", expires_at

    def verify(self, token: str) -> StreamGrant:
        """The grant of a well-signed, unexpired token; StreamTokenError otherwise."""
        payload, _, signature = token.partition(".")
        if not payload or not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            raise StreamTokenError("invalid stream token")
        try:
            claims = orjson.loads(_unb64(payload))
            grant = StreamGrant(
                thread_id=str(claims["t"]),
                run_id=None if claims.get("r") is None else str(claims["r"]),
                expires_at=int(claims["exp"]),
                subject=None if claims.get("sub") is None else str(claims["sub"]),
            )
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise StreamTokenError("invalid stream token") from None
        if grant.expires_at <= time.time():
            raise StreamTokenError("stream token expired", expired=True)
        return grant
