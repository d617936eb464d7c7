"""Domain errors raised by the service cores, and their gRPC status codes.

Cores raise these (or library errors such as GenerationError); one server interceptor turns
them into status codes so no servicer repeats the mapping and no traceback reaches a client.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: an error whose message is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Malformed input: bad sampling parameters, ids outside the vocabulary, empty input."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    """Input larger than a configured limit (prompt tokens, new tokens, samples, batch)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# trailing metadata that marks a RESOURCE_EXHAUSTED as "at capacity, retry shortly" rather than
# "this request is over a limit, ask for less"; its value is the suggested wait in seconds
OVERLOADED_KEY = "palm-rlhf-overloaded-retry-after"


class Overloaded(ResourceExhausted):
    """The service is at capacity (its queue is full): the same request may succeed shortly."""

    trailing_metadata = ((OVERLOADED_KEY, "1"),)


class Unavailable(ServiceError):
    """The service cannot take requests now (loading a model, draining); retry elsewhere/later."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(ServiceError):
    """An unknown checkpoint version or scorer."""

    code = grpc.StatusCode.NOT_FOUND


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work could finish."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    """An admin RPC without the right bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ServiceError):
    """The request is valid but the system is not in a state to run it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and client-safe message for a known error, or None for a bug.

    Library errors are mapped here so the cores can let them propagate: GenerationError and
    other ValueErrors are the caller's fault (INVALID_ARGUMENT), CheckpointError means a
    version that does not exist or cannot be read (NOT_FOUND).
    """
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    from palm_rlhf.checkpoint import CheckpointError
    from palm_rlhf.generation import GenerationError

    if isinstance(exc, GenerationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, CheckpointError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return None
