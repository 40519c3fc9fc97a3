"""Domain errors: what a service's rules raise, and the gRPC status each becomes.

Servicers and domain modules raise these; the error-mapping interceptor turns them into a
status with rich details (google.rpc.BadRequest, ErrorInfo, RetryInfo). Anything else that
escapes a handler becomes INTERNAL with a generic message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

ERROR_DOMAIN = "learnmesh"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of the errors a caller is meant to see; ``message`` is safe to show."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, reason: str = "", metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        # Machine-readable (google.rpc.ErrorInfo.reason), for example "MFA_REQUIRED".
        self.reason = reason
        self.metadata = metadata or {}


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[FieldViolation], message: str = "") -> None:
        self.violations = list(violations)
        fields = ", ".join(dict.fromkeys(v.field for v in self.violations))  # each field once
        super().__init__(message or f"invalid request: {fields}", reason="INVALID_ARGUMENT")

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)], f"{field}: {description}")


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float, reason: str = "RATE_LIMITED") -> None:
        super().__init__(message, reason=reason)
        # Seconds until a retry may succeed (google.rpc.RetryInfo).
        self.retry_after = retry_after


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
