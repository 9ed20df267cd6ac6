"""Webhook signatures: HMAC-SHA256 over `"<timestamp>.<body>"`, sent as `X-EigenShift-Signature: sha256=<hex>`.

The one implementation: the service signs with `sign`, receivers check with `verify_signature`. Standard
library only, so the worker can import it without the HTTP client.
"""

from __future__ import annotations

import hashlib
import hmac
import time

PREFIX = "sha256="
DEFAULT_TOLERANCE_S = 300


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def sign(secret: str, timestamp: int | str, body: bytes | str) -> str:
    """The `X-EigenShift-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    message = _bytes(f"{timestamp}.") + _bytes(body)
    return PREFIX + hmac.new(_bytes(secret), message, hashlib.sha256).hexdigest()


def verify_signature(secret: str, timestamp: int | str, body: bytes | str, signature: str,
                     tolerance_s: float = DEFAULT_TOLERANCE_S, *, now: float | None = None) -> bool:
    """True when `signature` (the `X-EigenShift-Signature` header) signs `body` (the raw request body) at
    `timestamp` (the `X-EigenShift-Timestamp` header) with `secret`, and that timestamp is within
    `tolerance_s` of now (older deliveries are refused, so a captured request cannot be replayed later)."""
    try:
        sent = int(str(timestamp).strip())
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance_s:
        return False
    expected = _bytes(sign(secret, str(timestamp).strip(), body))
    try:
        given = signature.strip().lower().encode("ascii")
    except (AttributeError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(expected, given)
