"""Message shapes of the PD proxy protocol: pure functions on JSON bodies.

The prefill leg gets a copy of the client's body that asks for one token and
for the KV cache to be kept for a remote decoder; the decoder gets the
client's body plus the ``kv_transfer_params`` the prefiller answered with.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pdsupervisord.proxy.errors import BadRequestError

__all__ = [
    "REQUEST_ID_HEADER",
    "JSONObject",
    "StreamTail",
    "check_stream_options",
    "decode_body",
    "decode_payload",
    "error_body",
    "is_streamed",
    "kv_params_of",
    "parse_body",
    "prefill_body",
    "request_id",
    "sse_error_event",
]

JSONObject = dict[str, Any]

REQUEST_ID_HEADER = "X-Request-Id"

# Long enough for any id scheme in use; bounds what ends up in logs.
_MAX_REQUEST_ID_LENGTH = 256

_DONE_MARKER = b"data: [DONE]"
_TAIL_BYTES = 64


def request_id(header_value: str | None) -> str:
    """The client's ``X-Request-Id``, or a fresh uuid4 hex when absent.

    Raises:
        BadRequestError: the header is longer than 256 characters.
    """
    if header_value is None or not header_value.strip():
        return uuid.uuid4().hex
    value = header_value.strip()
    if len(value) > _MAX_REQUEST_ID_LENGTH:
        raise BadRequestError(
            400, f"X-Request-Id is longer than {_MAX_REQUEST_ID_LENGTH}"
        )
    return value


def parse_body(raw: bytes) -> JSONObject:
    """Decode a client's request body.

    Raises:
        BadRequestError: the body is not a JSON object.
    """
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequestError(400, "request body must be a JSON object")
    return body


def is_streamed(body: JSONObject) -> bool:
    """Whether the client asked for a server-sent event stream."""
    return body.get("stream") is True


def check_stream_options(body: JSONObject) -> None:
    """Refuse ``stream_options`` on a request that is not streamed.

    vLLM refuses it too, with this message, but only on the decode leg: the
    prefill leg (which never carries ``stream_options``) would have run, and
    its KV blocks would wait for a decoder that never pulls them.

    Raises:
        BadRequestError: ``stream_options`` is set and ``stream`` is not true.
    """
    # The same truthiness test as vLLM's request validators.
    if body.get("stream_options") and not body.get("stream"):
        raise BadRequestError(
            400, "Stream options can only be defined when `stream=True`."
        )


def prefill_body(body: JSONObject) -> JSONObject:
    """The prefill leg's body: one token, no stream, KV kept for a decoder.

    ``min_tokens: 1`` matters: a first token that is EOS would otherwise end
    the request without ``kv_transfer_params``.
    """
    leg = dict(body)
    leg["stream"] = False
    leg["max_tokens"] = 1
    leg["min_tokens"] = 1
    if "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    leg.pop("stream_options", None)
    leg["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return leg


def kv_params_of(answer: JSONObject) -> JSONObject | None:
    """The prefiller's ``kv_transfer_params``, untouched, or None if absent."""
    params = answer.get("kv_transfer_params")
    return params if isinstance(params, dict) else None


def decode_body(body: JSONObject, kv_params: JSONObject | None) -> JSONObject:
    """The decode leg's body: the client's, with the prefiller's params.

    With no params (the fallback mode) the client's body goes unchanged and
    the decoder does the prefill itself.
    """
    if kv_params is None:
        return body
    return {**body, "kv_transfer_params": kv_params}


def decode_payload(raw: bytes, body: JSONObject, kv_params: JSONObject | None) -> bytes:
    """The decode leg's bytes: `decode_body`, without re-encoding the body.

    The client's bytes are kept and ``"kv_transfer_params": {...}`` is put in
    before the closing brace, so a large body (multimodal requests carry
    base64 images) is not encoded again. A body that already has the key, or
    is not plain UTF-8 JSON text, is encoded anew.

    Args:
        raw: the client's request body, as received.
        body: the same, decoded.
        kv_params: the prefiller's ``kv_transfer_params``, or None (fallback).
    """
    if kv_params is None:
        return raw
    head = raw.rstrip()
    splice = (
        bool(body)
        and "kv_transfer_params" not in body
        and raw.lstrip().startswith(b"{")
        and head.endswith(b"}")
    )
    params = json.dumps(kv_params, ensure_ascii=False).encode()
    if splice:
        return head[:-1] + b', "kv_transfer_params": ' + params + b"}"
    return json.dumps(decode_body(body, kv_params), ensure_ascii=False).encode()


def error_body(status: int, error_type: str, message: str) -> JSONObject:
    """An OpenAI-style error object."""
    return {
        "error": {
            "message": message,
            "type": error_type,
            "param": None,
            "code": status,
        }
    }


def sse_error_event(status: int, error_type: str, message: str) -> bytes:
    """A server-sent event carrying an OpenAI-style error object."""
    payload = json.dumps(error_body(status, error_type, message))
    return f"data: {payload}\n\n".encode()


class StreamTail:
    """The last bytes of a relayed stream, to see how it ended."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Remember the end of what has been relayed so far."""
        self._tail = (self._tail + chunk)[-_TAIL_BYTES:]

    @property
    def finished(self) -> bool:
        """Whether the stream ended with ``data: [DONE]``."""
        return self._tail.rstrip().endswith(_DONE_MARKER)

    @property
    def at_event_boundary(self) -> bool:
        """Whether the relayed bytes end between two events."""
        return not self._tail or self._tail.endswith((b"\n\n", b"\r\n\r\n"))
