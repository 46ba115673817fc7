"""Exceptions raised by the normserve client.

Every failed call raises a :class:`NormserveError` subclass that carries the
gRPC status code (``err.code``, a ``grpc.StatusCode``), the server's message
(``err.details``) and the call that failed (``err.method``)::

    try:
        client.forward("bn1", x, training=True)
    except normserve.InvalidArgumentError as err:   # also a ValueError
        print(err.code.name, err.details)
"""

import grpc

__all__ = [
    "NormserveError", "CancelledError", "InvalidArgumentError",
    "DeadlineExceededError", "NotFoundError", "AlreadyExistsError",
    "PermissionDeniedError", "ResourceExhaustedError",
    "FailedPreconditionError", "AbortedError", "OutOfRangeError",
    "UnimplementedError", "InternalError", "UnavailableError",
    "DataLossError", "UnauthenticatedError", "UnknownError", "error_from_code",
    "error_from_rpc",
]


class NormserveError(Exception):
    """A call failed. ``code`` is a grpc.StatusCode, ``details`` the message."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, code, details, method=None, target=None):
        self.code = code
        self.details = details
        self.method = method
        self.target = target
        super().__init__(str(self))

    def __str__(self):
        where = self.method or "normserve"
        if self.target:
            where = f"{where} ({self.target})"
        return f"{where}: {self.code.name}: {self.details}"

    def __reduce__(self):
        return (type(self), (self.code, self.details, self.method, self.target))


class CancelledError(NormserveError):
    pass


class UnknownError(NormserveError):
    pass


class InvalidArgumentError(NormserveError, ValueError):
    """Bad shape, dtype, byte count or config (also a ValueError)."""


class DeadlineExceededError(NormserveError):
    """The call's timeout passed."""


class NotFoundError(NormserveError, LookupError):
    """Unknown layer (also a LookupError)."""


class AlreadyExistsError(NormserveError):
    """A taken layer id; or a request_id already applied (a repeated
    training forward or accumulating backward) or used for another
    operation."""


class PermissionDeniedError(NormserveError):
    pass


class ResourceExhaustedError(NormserveError):
    """Over a server limit (message names the flag)."""


class FailedPreconditionError(NormserveError):
    """E.g. Backward on an unknown, evicted or consumed handle, or a layer
    not at the call's expected_version ("layers/x is at version 7; the
    request expected version 6")."""


class AbortedError(NormserveError):
    """E.g. a create or delete whose request_id an earlier attempt is still
    applying: retry."""


class OutOfRangeError(NormserveError):
    pass


class UnimplementedError(NormserveError):
    pass


class InternalError(NormserveError):
    pass


class UnavailableError(NormserveError):
    """The server cannot be reached, or is draining."""


class DataLossError(NormserveError):
    pass


class UnauthenticatedError(NormserveError):
    pass


_BY_CODE = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNKNOWN: UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_from_code(code, details, method=None, target=None):
    """Returns the exception for ``code`` (a grpc.StatusCode or its number)."""
    if not isinstance(code, grpc.StatusCode):
        code = _CODE_BY_NUMBER.get(int(code), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, NormserveError)(code, details, method, target)


def error_from_rpc(err, method=None, target=None):
    """Converts a grpc.RpcError into the matching NormserveError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNAVAILABLE and target:
        details = (f"{details} (is a normserve server running at {target}?)")
    return error_from_code(code, details or "", method, target)
