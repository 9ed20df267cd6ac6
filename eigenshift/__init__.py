"""EigenShift's Python client: `Client` / `AsyncClient` for a running service, and `verify_signature`
for receivers of its job webhooks. Imports nothing of the service itself.

The client's names are imported when first used, so `eigenshift.signing` (standard library only) can be
imported, by the service's worker among others, without the HTTP client and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from eigenshift.signing import sign, verify_signature

if TYPE_CHECKING:
    from eigenshift.client import (
        APIConnectionError,
        Artifact,
        AsyncClient,
        AuthenticationError,
        BadRequestError,
        Client,
        ConflictError,
        EigenShiftError,
        FieldError,
        Generation,
        Health,
        Intervention,
        Job,
        JobFailure,
        JobProgress,
        Moderation,
        ModerationResult,
        ModerationSpan,
        NotFoundError,
        PayloadTooLargeError,
        PermissionDeniedError,
        RateLimitError,
        ServerError,
        ServiceUnavailableError,
        ValidationError,
        WaitTimeout,
    )

__all__ = [
    "APIConnectionError", "Artifact", "AsyncClient", "AuthenticationError", "BadRequestError", "Client",
    "ConflictError", "EigenShiftError", "FieldError", "Generation", "Health", "Intervention", "Job", "JobFailure",
    "JobProgress", "Moderation", "ModerationResult", "ModerationSpan", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitError", "ServerError", "ServiceUnavailableError", "ValidationError",
    "WaitTimeout", "sign", "verify_signature",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("eigenshift.client"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
