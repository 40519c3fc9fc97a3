"""Error mapping: every exception leaving a handler becomes a gRPC status.

Domain errors keep their code and safe message and gain google.rpc details (ErrorInfo,
BadRequest, RetryInfo). Anything else becomes INTERNAL with a generic message and the
request id, so no stack trace, SQL or secret leaves the process; the full error is logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio

from interceptors.call_state import trailers
from interceptors.link import Behavior, ServerLink, around
from interceptors.method import MethodInfo
from learnmesh.kernel import principal
from learnmesh.kernel.errors import ERROR_DOMAIN, DomainError, InvalidArgument, ResourceExhausted

log = logging.getLogger("learnmesh.errors")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Codes from a service we called that mean "try again later" to our own caller too.
_PASS_THROUGH = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_of(error: DomainError) -> status_pb2.Status:
    """The rich google.rpc.Status for a domain error."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    if error.reason:
        status.details.append(
            _packed(
                error_details_pb2.ErrorInfo(
                    reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
                )
            )
        )
    if isinstance(error, InvalidArgument):
        status.details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(error.retry_after, 0) * 1e9))
        status.details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status


async def abort_with(context: aio.ServicerContext[Any, Any], status: status_pb2.Status) -> None:
    """Ends the call with ``status``, its details in ``grpc-status-details-bin``."""
    added = (*trailers(), (STATUS_DETAILS_KEY, status.SerializeToString()))
    await context.abort(grpc.StatusCode(_CODES[status.code]), status.message, added)


_CODES = {code.value[0]: code.value for code in grpc.StatusCode}


def internal_status() -> status_pb2.Status:
    request_id = principal.call_info().request_id
    message = "internal error"
    if request_id:
        message += f"; quote request id {request_id} when reporting it"
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)


async def map_exception(
    exc: BaseException, context: aio.ServicerContext[Any, Any], method: str
) -> None:
    """Aborts the call with the status ``exc`` stands for; returns only for control-flow
    exceptions (an abort already under way, cancellation), which the caller re-raises."""
    if isinstance(exc, aio.AbortError | asyncio.CancelledError | GeneratorExit):
        return
    if isinstance(exc, DomainError):
        await abort_with(context, status_of(exc))
    if isinstance(exc, aio.AioRpcError) and exc.code() in _PASS_THROUGH:
        log.warning("%s: upstream call failed: %s %s", method, exc.code().name, exc.details())
        status = status_pb2.Status(
            code=exc.code().value[0],
            message=f"a call this one depends on ended with {exc.code().name}",
        )
        await abort_with(context, status)
    log.error("%s failed", method, exc_info=exc)
    await abort_with(context, internal_status())


class ErrorMapping(ServerLink):
    needs_request = False  # the request message is not looked at

    def wrap(self, method: MethodInfo, behavior: Behavior) -> Behavior:
        async def on_error(exc: BaseException, context: aio.ServicerContext[Any, Any]) -> None:
            await map_exception(exc, context, method.full_method)

        return around(method, behavior, on_error)
