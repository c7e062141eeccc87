"""Domain exceptions and the one place that maps them to gRPC statuses.

Servicers and domain code raise these; `ErrorInterceptor` turns them into a status
with `google.rpc` details a client can act on (BadRequest, RetryInfo, ErrorInfo).
Anything else is a bug: logged with the trace id, answered as a generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace

from services.kit.interceptors import Around, AroundInterceptor, Context
from services.kit.protos import duration

log = logging.getLogger("ballast.kit.errors")


class BallastError(Exception):
    """Base of errors that map to a gRPC status other than INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    #: Extra trailing metadata for the client (for example rate-limit headers).
    trailing: tuple[tuple[str, str], ...] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[Any]:
        return []


class InvalidArgument(BallastError):
    """Malformed or out-of-range input; names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def details(self) -> list[Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=self.field, description=self.description
        )
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class Unauthenticated(BallastError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BallastError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(BallastError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BallastError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(BallastError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(BallastError):
    """Optimistic concurrency conflict; carries the current version."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, *, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version

    def details(self) -> list[Any]:
        if self.current_version is None:
            return []
        return [
            error_details_pb2.ErrorInfo(
                reason="VERSION_CONFLICT",
                domain="ballast",
                metadata={"current_version": str(self.current_version)},
            )
        ]


class ResourceExhausted(BallastError):
    """Limited or out of budget; says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason

    def details(self) -> list[Any]:
        out: list[Any] = []
        if self.retry_after is not None:
            out.append(error_details_pb2.RetryInfo(retry_delay=duration(self.retry_after)))
        if self.reason:
            out.append(error_details_pb2.ErrorInfo(reason=self.reason, domain="ballast"))
        return out


class Unavailable(BallastError):
    """A backend or provider is down; retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BallastError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Forwarded(BallastError):
    """A status from a downstream service, passed on with its code and google.rpc details."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[Any]) -> None:
        super().__init__(message)
        self.code = code
        self._details = details

    def details(self) -> list[Any]:
        return list(self._details)


def to_status(error: BallastError) -> grpc.Status:
    """The status (with packed details in trailing metadata) for a domain error."""
    packed = []
    for detail in error.details():
        if isinstance(detail, any_pb2.Any):
            packed.append(detail)
            continue
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    proto = status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def _trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else "none"


async def abort_with(context: Context, error: BallastError) -> NoReturn:
    """Ends the call with the error's status, details and trailing metadata; for code that
    runs outside `ErrorInterceptor`, such as an interceptor that sheds load."""
    status = to_status(error)
    await context.abort(status.code, status.details, (*status.trailing_metadata, *error.trailing))


async def _abort(context: Context, exc: BaseException, method: str) -> None:
    if isinstance(exc, BallastError):
        await abort_with(context, exc)
    if isinstance(exc, NotImplementedError):
        # The generated base servicers raise this for methods a service does not implement.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    trace_id = _trace_id()
    log.error("unhandled error in %s (trace_id=%s)", method, trace_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (trace id {trace_id})")


def _is_passthrough(exc: BaseException) -> bool:
    # context.abort() raises an exception that must reach grpc untouched, as must cancellation.
    return not isinstance(exc, Exception) or type(exc).__module__.startswith(("grpc", "asyncio"))


def _cancellation(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised while handling, the task's cancellation (a driver may
    turn a cancelled read into its own error type). A domain error means what it says, and a
    TimeoutError is the handler's own `asyncio.timeout` (which works by cancelling), not the
    client going away."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None or isinstance(seen, BallastError | TimeoutError):
            return False
        if isinstance(seen, asyncio.CancelledError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ErrorInterceptor(AroundInterceptor):
    """Maps exceptions raised by servicers to statuses, for unary and streaming responses."""

    def around(self, method: str) -> Around | None:
        class Mapped:
            # A plain class, not @asynccontextmanager: it runs around every call (see Timed).
            __slots__ = ("context",)

            def __init__(self, context: Context) -> None:
                self.context = context

            async def __aenter__(self) -> None:
                return None

            async def __aexit__(
                self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
            ) -> None:
                if exc is None:
                    return
                if _cancellation(exc) or (self.context.cancelled() and not isinstance(exc, BallastError)):
                    # The client went away (or the server is stopping): routine, not a bug, and
                    # whatever the cancellation made the handler raise says nothing new.
                    log.debug("call cancelled: %s (%s)", method, type(exc).__name__)
                    if not _is_passthrough(exc):
                        await self.context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
                    return
                if not _is_passthrough(exc):
                    await _abort(self.context, exc, method)  # always raises: the call ends here

        return Mapped
