"""The control protocol's wire format: one JSON object per ZeroMQ message.

Request: ``{"id": any, "command": str, "args": {...}, "version": 1}``.
Reply: ``{"id", "ok": true, "result": ...}`` or
``{"id", "ok": false, "error": {"code": str, "message": str}}``.
Pure encoding and validation; no sockets here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "ProtocolError",
    "Request",
    "decode_request",
    "encode_request",
    "error_reply",
    "ok_reply",
]

PROTOCOL_VERSION = 1

#: Larger frames are dropped by ZeroMQ itself (ZMQ_MAXMSGSIZE) before parsing.
MAX_MESSAGE_BYTES = 64 * 1024


class ErrorCode:
    """Every error code a reply can carry."""

    BAD_REQUEST = "bad_request"  # not JSON, not an object, wrong field types
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"  # missing or wrongly typed arguments
    UNKNOWN_INSTANCE = "unknown_instance"
    SCALE = "scale"  # outside min..max, or the pool is exhausted
    INVALID_CONFIG = "invalid_config"  # reload: the topology file is invalid
    NOT_FOUND = "not_found"  # e.g. tail of an instance that never logged
    TIMEOUT = "timeout"  # wait: the state was not reached in time
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"  # a bug in the daemon; the daemon keeps running


class ProtocolError(Exception):
    """Raised by :func:`decode_request` for a malformed request."""

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class Request:
    """A decoded, type-checked request."""

    id: Any
    command: str
    args: dict[str, Any] = field(default_factory=dict)


def encode_request(request_id: Any, command: str, args: dict[str, Any]) -> bytes:
    """Encode a request for the wire."""
    body = {"id": request_id, "command": command, "args": args}
    return json.dumps({**body, "version": PROTOCOL_VERSION}).encode()


def decode_request(frame: bytes) -> Request:
    """Decode one request frame.

    Raises:
        ProtocolError: for anything but a JSON object with a string
            ``command`` and an object ``args``.
    """
    try:
        body = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"not JSON: {exc}") from None
    except RecursionError:
        # Deeply nested arrays fit in a small frame and exhaust the parser.
        raise ProtocolError(ErrorCode.BAD_REQUEST, "JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request must be a JSON object")
    request_id = body.get("id")
    command = body.get("command")
    args = body.get("args", {})
    if not isinstance(command, str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'command' must be a string", request_id
        )
    if not isinstance(args, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'args' must be an object", request_id
        )
    return Request(request_id, command, args)


def ok_reply(request_id: Any, result: Any) -> bytes:
    """Encode a success reply."""
    return _encode({"id": request_id, "ok": True, "result": result})


def error_reply(request_id: Any, code: str, message: str) -> bytes:
    """Encode an error reply."""
    error = {"code": code, "message": message}
    return _encode({"id": request_id, "ok": False, "error": error})


def _encode(reply: dict[str, Any]) -> bytes:
    """Strict JSON (no NaN/Infinity); an id that cannot be echoed becomes null."""
    try:
        return json.dumps(reply, allow_nan=False).encode()
    except (ValueError, RecursionError):
        reply = {**reply, "id": None}
        return json.dumps(reply, allow_nan=False, default=str).encode()
