"""API keys: `Authorization: Bearer <key>`, stored as SHA-256 digests, compared in constant time, each with
scopes; and a per-key token bucket in Redis.

Scopes: generate, score, jobs:write, jobs:read, admin (admin holds every scope).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.errors import Problem
from workers.settings import ApiKeySpec, Scope, Settings

bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")

# KEYS[1] the bucket; ARGV rate per second, burst. Answers {allowed, seconds to wait}. Redis's own clock,
# so every API process shares one bucket per key.
TOKEN_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or t
tokens = math.min(burst, tokens + math.max(0, t - at) * rate)
local allowed, wait = 0, 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


def digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def ensure_admin_key(path: Path) -> tuple[str, bool]:
    """The admin key kept at `path`, generated (mode 0600) when missing; and whether it was just made."""
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "esk_" + secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key, True


@dataclass(frozen=True)
class Principal:
    """The caller: the key's name, its scopes and its rate limit."""

    name: str
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: int | None = None

    def allows(self, scope: Scope) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class KeyRing:
    """The configured keys by digest; lookup compares every digest in constant time."""

    def __init__(self, specs: list[ApiKeySpec]) -> None:
        self._keys = [(spec.sha256, Principal(spec.name, frozenset(spec.scopes), spec.rate_per_s, spec.burst)) for spec in specs]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        specs = list(settings.api_keys)
        if settings.admin_key_file:
            key, _ = ensure_admin_key(settings.api_key_path)
            specs.append(ApiKeySpec(name="admin", sha256=digest(key), scopes=["admin"]))
        return cls(specs)

    def lookup(self, key: str) -> Principal | None:
        wanted = digest(key)
        found = None
        for stored, principal in self._keys:  # no early exit: the time taken says nothing about which matched
            if hmac.compare_digest(stored, wanted):
                found = principal
        return found


def _take_token(client: redis.Redis, bucket: str, rate: float, burst: int) -> float:
    """0 when the request may go on, else the seconds until the bucket holds a token."""
    allowed, wait = client.eval(TOKEN_BUCKET, 1, bucket, rate, burst)  # type: ignore[misc]
    return 0.0 if int(allowed) else float(wait)


def key_name(request: Request) -> str:
    """The name of the key that `requires` let through for this request ("" when none was checked)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.name if principal is not None else ""


def requires(scope: Scope) -> Any:
    """A dependency: the caller's key must be valid (else 401), hold `scope` (else 403) and be within its rate
    (else 429 with Retry-After)."""

    async def check(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Principal:
        keys: KeyRing | None = getattr(request.app.state, "keys", None)
        principal = keys.lookup(credentials.credentials) if keys is not None and credentials is not None else None
        if principal is None:
            raise Problem(401, "a valid API key is required: Authorization: Bearer <key>", slug="unauthorized",
                          headers={"WWW-Authenticate": "Bearer"})
        if not principal.allows(scope):
            raise Problem(403, f"this key lacks the scope {scope!r}", slug="insufficient-scope")
        settings: Settings = request.app.state.settings
        rate, burst = principal.rate_per_s or settings.rate_limit_per_s, principal.burst or settings.rate_limit_burst
        wait = await run_in_threadpool(_take_token, request.app.state.service.redis,
                                       f"{settings.key_prefix}:ratelimit:{principal.name}", rate, burst)
        if wait > 0:
            raise Problem(429, f"rate limit of {rate:g} requests/s (burst {burst}) for key "
                          f"{principal.name!r} exceeded", slug="rate-limited",
                          headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        request.state.principal = principal  # the route passes its name on (the batcher's per-key share)
        return principal

    return Depends(check)
