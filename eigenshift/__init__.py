"""EigenShift's Python client: `Client` / `AsyncClient` for a running service, and `verify_signature`
for receivers of its job webhooks. Imports nothing of the service itself."""

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
from eigenshift.signing import sign, verify_signature

__all__ = [
    "APIConnectionError", "Artifact", "AsyncClient", "AuthenticationError", "BadRequestError", "Client",
    "ConflictError", "EigenShiftError", "FieldError", "Generation", "Health", "Intervention", "Job", "JobFailure",
    "JobProgress", "Moderation", "ModerationResult", "ModerationSpan", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitError", "ServerError", "ServiceUnavailableError", "ValidationError",
    "WaitTimeout", "sign", "verify_signature",
]
