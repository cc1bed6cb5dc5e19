"""The proxy's exceptions, and the one table that turns failures into answers.

Tree::

    ProxyError                 root of everything the proxy raises itself
    ├── BadRequestError             the client's request is unusable; we answer 4xx
    ├── UpstreamRejectedError       an upstream answered 4xx; relayed verbatim
    ├── AttemptError          one try on one backend failed; may be retried
    └── RequestFailedError          final failure; answered as a JSON error

Upstream failures are classified by `FailureKind`. `FAILURE_REPLIES` gives
the HTTP status and OpenAI error ``type`` the client gets for each kind.
"""

from __future__ import annotations

import enum

from pdsupervisord.proxy.backends import Address, Role

__all__ = [
    "FAILURE_REPLIES",
    "AttemptError",
    "BadRequestError",
    "FailureKind",
    "ProxyError",
    "RequestFailedError",
    "UpstreamRejectedError",
]


class FailureKind(enum.Enum):
    """Why an upstream attempt failed; the value is a metrics label."""

    REFUSED = "refused"
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    BAD_STATUS = "bad_status"
    BAD_ANSWER = "bad_answer"
    MISSING_KV_PARAMS = "missing_kv_transfer_params"
    MIDSTREAM = "midstream"
    NO_BACKEND = "no_backend"


FAILURE_REPLIES: dict[FailureKind, tuple[int, str]] = {
    FailureKind.REFUSED: (503, "upstream_unavailable"),
    FailureKind.NO_BACKEND: (503, "upstream_unavailable"),
    FailureKind.TIMEOUT: (504, "upstream_timeout"),
    FailureKind.DISCONNECTED: (502, "upstream_error"),
    FailureKind.BAD_STATUS: (502, "upstream_error"),
    FailureKind.BAD_ANSWER: (502, "upstream_error"),
    FailureKind.MIDSTREAM: (502, "upstream_error"),
    FailureKind.MISSING_KV_PARAMS: (502, "missing_kv_transfer_params"),
}


class ProxyError(Exception):
    """Root of the proxy's own exceptions."""


class BadRequestError(ProxyError):
    """Raised when a client request cannot be forwarded (bad JSON, too big)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamRejectedError(ProxyError):
    """Raised when a backend answers 4xx: the client gets that answer as is."""

    def __init__(self, status: int, body: bytes, content_type: str | None) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class AttemptError(ProxyError):
    """Raised when one attempt on one backend fails; the caller may retry."""

    def __init__(
        self, role: Role, address: Address, kind: FailureKind, detail: str
    ) -> None:
        self.role = role
        self.address = address
        self.kind = kind
        self.message = f"{role.value} backend {address}: {detail}"
        super().__init__(self.message)


class RequestFailedError(ProxyError):
    """Raised when a request has definitely failed; says what to answer."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def status(self) -> int:
        """HTTP status for the client."""
        return FAILURE_REPLIES[self.kind][0]

    @property
    def error_type(self) -> str:
        """OpenAI-style error ``type`` for the client."""
        return FAILURE_REPLIES[self.kind][1]
