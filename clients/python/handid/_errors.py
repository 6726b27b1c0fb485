"""Exceptions: a refused call as a :class:`HandIdError` carrying its gRPC status."""

from typing import Dict, Type

import grpc


class HandIdError(Exception):
    """A call the server refused, or one that could not reach it.

    ``code`` is the gRPC status code and ``message`` the server's message,
    verbatim (it names the field, image or limit at fault; it never holds
    image bytes). A subclass per common code lets callers catch just that
    one, e.g. ``except handid.NotFound``.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class InvalidArgument(HandIdError):
    """A bad request: not an image, an image too large, too small or of an
    odd shape, an empty or malformed id, top_k out of range."""


class NotFound(HandIdError):
    """An unknown gallery or subject."""


class AlreadyExists(HandIdError):
    """An idempotency key reused with another subject or other images."""


class PermissionDenied(HandIdError):
    """The key lacks the method's scope or the gallery (or a client
    certificate has no grant)."""


class Unauthenticated(HandIdError):
    """No API key, or one the server does not know."""


class ResourceExhausted(HandIdError):
    """The server sheds load, or the caller passed its rate, concurrency or
    gallery limit: retry with backoff."""


class FailedPrecondition(HandIdError):
    """The call cannot apply in the server's current state: no calibrated
    threshold for the default rule, a reload of another embedding space,
    nothing staged to promote or cancel, a refused rollback or settings file."""


class Aborted(HandIdError):
    """The call lost to a concurrent change and was rolled back: retry."""


class OutOfRange(HandIdError):
    """A message larger than the server's ``limits.max_message_bytes``."""


class Unavailable(HandIdError):
    """The server cannot be reached (or the TLS handshake failed), its
    database is unreachable, the model cannot run on this replica, or it is
    shutting down: retry, on another replica if you can."""


class DeadlineExceeded(HandIdError):
    """The call ran past the client's timeout or the server's request
    timeout."""


class Internal(HandIdError):
    """A server fault; the details are only in the server's log."""


_BY_CODE: Dict[grpc.StatusCode, Type[HandIdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def error_from_rpc(error: grpc.RpcError) -> HandIdError:
    """The :class:`HandIdError` (subclass) for a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else None) or ""
    return _BY_CODE.get(code, HandIdError)(code, message)
