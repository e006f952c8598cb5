"""Error kinds of the core. The edges map each kind to an HTTP or gRPC status.

No HTTP or gRPC codes here: the core says what went wrong, each edge says how its
protocol spells it (one table per edge).
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    NOT_FOUND = "NOT_FOUND"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"


class ServerError(Exception):
    """An error with a kind the edges can map and a message fit for the client."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(
        self, message: str, kind: ErrorKind | None = None, *, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.retry_after = retry_after  # seconds until a retry can succeed, when known

    @property
    def message(self) -> str:
        return str(self.args[0])


class NotFound(ServerError):
    kind = ErrorKind.NOT_FOUND


class InvalidArgument(ServerError):
    kind = ErrorKind.INVALID_ARGUMENT


class AlreadyExists(ServerError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(ServerError):
    """The client's condition (e.g. If-Match on a routing change) no longer holds."""

    kind = ErrorKind.FAILED_PRECONDITION


class Unavailable(ServerError):
    kind = ErrorKind.UNAVAILABLE


class ResourceExhausted(ServerError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServerError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Unauthenticated(ServerError):
    kind = ErrorKind.UNAUTHENTICATED


class Unimplemented(ServerError):
    kind = ErrorKind.UNIMPLEMENTED


class Internal(ServerError):
    kind = ErrorKind.INTERNAL


def shown(value: object) -> str:
    """A client's value in an error message: short, and safe however deeply it nests
    (the repr of JSON nested a thousand levels deep exceeds the recursion limit)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str | bytes):
        value = value[:40]
    return f"{value!r:.40}"
