"""OpenAI request parsing and response shapes, as vLLM's server produces them.

Pure functions: JSON in, dataclasses or JSON-ready dicts out. Invalid requests
raise :class:`~pdsupervisord.engine.errors.RequestError` carrying the status
vLLM would answer with.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from pdsupervisord.engine.errors import RequestError
from pdsupervisord.engine.generate import media_token_ids, text_token_ids

__all__ = [
    "Endpoint",
    "Envelope",
    "GenerationRequest",
    "KVParams",
    "RemoteKV",
    "bad_request",
    "completion_chunk",
    "error_body",
    "full_body",
    "parse_request",
    "resolve_max_tokens",
    "sse_event",
    "usage",
    "usage_chunk",
]

_MEDIA_PARTS = ("image_url", "video_url", "audio_url", "input_audio")


class Endpoint(enum.Enum):
    """The two generation endpoints, with their id prefix and object names."""

    COMPLETIONS = ("cmpl", "text_completion", "text_completion")
    CHAT = ("chatcmpl", "chat.completion", "chat.completion.chunk")

    def __init__(self, id_prefix: str, body_object: str, chunk_object: str) -> None:
        self.id_prefix = id_prefix
        self.body_object = body_object
        self.chunk_object = chunk_object


@dataclass(frozen=True)
class RemoteKV:
    """Where a decode leg pulls its KV from.

    Attributes:
        host: The producer's side-channel host (``remote_host``).
        port: The producer's side-channel port (``remote_port``).
        block_ids: Block ids to pull (``remote_block_ids``).
        request_id: The producer's request id (``remote_request_id``), when
            the producer sent one.
    """

    host: str
    port: int
    block_ids: tuple[int, ...]
    request_id: str | None


@dataclass(frozen=True)
class KVParams:
    """The ``kv_transfer_params`` of a request (facts §4).

    Attributes:
        do_remote_decode: Prefill here and keep the KV for a remote decoder.
        remote: Set when ``do_remote_prefill``: pull the KV from there.
    """

    do_remote_decode: bool
    remote: RemoteKV | None


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completions or chat completions request.

    Attributes:
        endpoint: Which endpoint it came to.
        model: The requested model name; None means the first served name.
        prompt: Prompt token ids (chat: after the stand-in's chat template).
        media_parts: Number of image/audio/video parts counted, never fetched.
        max_tokens: Requested limit, None for "up to the context length".
        min_tokens: Fewest tokens to generate.
        ignore_eos: Generate exactly ``max_tokens``.
        seed: Request seed, None for the engine's ``--seed``.
        stream: Answer with server-sent events.
        include_usage: Send a usage chunk before ``[DONE]``.
        kv: The ``kv_transfer_params``, if any.
    """

    endpoint: Endpoint
    model: str | None
    prompt: tuple[int, ...]
    media_parts: int
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    seed: int | None
    stream: bool
    include_usage: bool
    kv: KVParams | None


def bad_request(message: str) -> RequestError:
    """A 400 error in vLLM's wording."""
    return RequestError(400, "BadRequestError", message)


def parse_request(endpoint: Endpoint, body: object) -> GenerationRequest:
    """Validate a request body.

    Raises:
        RequestError: 400 for anything vLLM's request models would reject, and
            for features the stand-in does not model (``n`` > 1, batches of
            prompts).
    """
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    if endpoint is Endpoint.CHAT:
        prompt, media = _chat_prompt(body.get("messages"))
        max_tokens = _optional_int(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = _optional_int(body, "max_tokens", minimum=1)
    else:
        prompt, media = _completion_prompt(body.get("prompt")), 0
        max_tokens = _optional_int(body, "max_tokens", minimum=1)

    min_tokens = _optional_int(body, "min_tokens", minimum=0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({min_tokens}) must be less than or equal to "
            f"max_tokens ({max_tokens})"
        )
    if _optional_int(body, "n", minimum=1) not in (None, 1):
        raise bad_request("the stand-in engine supports n=1 only")

    stream = _optional_bool(body, "stream")
    return GenerationRequest(
        endpoint=endpoint,
        model=_optional_str(body, "model"),
        prompt=tuple(prompt),
        media_parts=media,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=_optional_bool(body, "ignore_eos"),
        seed=_optional_int(body, "seed", minimum=None),
        stream=stream,
        include_usage=_include_usage(body, stream),
        kv=_kv_params(body.get("kv_transfer_params")),
    )


def resolve_max_tokens(request: GenerationRequest, max_model_len: int) -> int:
    """The effective ``max_tokens``, checked against the context length.

    Raises:
        RequestError: 400 when prompt plus ``max_tokens`` exceed it.
    """
    room = max_model_len - len(request.prompt)
    if room < 1:  # vLLM 0.32's wording, measured
        raise RequestError(
            400,
            "BadRequestError",
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, your prompt contains at least {len(request.prompt)} input "
            "tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={len(request.prompt)})",
            param="input_tokens",
        )
    wanted = request.max_tokens if request.max_tokens is not None else room
    if wanted > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {len(request.prompt) + wanted} tokens "
            f"({len(request.prompt)} in the messages, {wanted} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    return wanted


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int | None]:
    """An OpenAI ``usage`` object, with vLLM 0.32's (null) detail fields."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


@dataclass(frozen=True)
class Envelope:
    """Fields every answer and chunk of one request repeats.

    Attributes:
        endpoint: The endpoint answered.
        request_id: The ``id`` field, e.g. ``chatcmpl-<X-Request-Id>``.
        model: The model name answered with.
        created: Unix time the request arrived.
        fingerprint: ``system_fingerprint``, constant for one engine.
    """

    endpoint: Endpoint
    request_id: str
    model: str
    created: int
    fingerprint: str = "vllm-standin"

    def wrap(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A body or chunk with these fields and ``choices``."""
        return {
            "id": self.request_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def full_body(
    envelope: Envelope,
    text: str,
    finish_reason: str,
    token_usage: Mapping[str, int | None],
    kv_transfer_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A non-streamed answer, field for field as vLLM 0.32 writes it.

    ``kv_transfer_params`` is always present (null when there are none); the
    other fields the stand-in has no value for are null, as they are in vLLM
    for a plain request.
    """
    choice: dict[str, Any] = {"index": 0}
    if envelope.endpoint is Endpoint.CHAT:
        choice["message"] = {"role": "assistant", "content": text} | dict.fromkeys(
            ("refusal", "annotations", "audio", "function_call", "reasoning")
        )
        choice["logprobs"] = None
    else:
        choice.update(text=text, logprobs=None)
    choice.update(finish_reason=finish_reason, stop_reason=None, token_ids=None)
    if envelope.endpoint is Endpoint.COMPLETIONS:
        choice.update(prompt_logprobs=None, prompt_token_ids=None)
    choice["routed_experts"] = None

    body = envelope.wrap(envelope.endpoint.body_object, [choice])
    body.update(service_tier=None, system_fingerprint=envelope.fingerprint)
    body["usage"] = dict(token_usage)
    if envelope.endpoint is Endpoint.CHAT:
        body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
    body["kv_transfer_params"] = (
        dict(kv_transfer_params) if kv_transfer_params else None
    )
    body.update(ec_transfer_params=None, metrics=None)
    return body


def completion_chunk(
    envelope: Envelope, delta: Mapping[str, str], finish_reason: str | None
) -> dict[str, Any]:
    """One streamed chunk.

    Chat chunks have vLLM 0.32's shape: the first (``role``) chunk carries
    null ``prompt_token_ids`` and ``prompt_text``, token chunks a null
    ``token_ids``, and only the last one ``stop_reason`` and
    ``system_fingerprint``.

    Args:
        envelope: The request's common fields.
        delta: For chat the ``delta`` object (``role`` and/or ``content``); for
            completions ``{"text": ...}``.
        finish_reason: Set on the last token's chunk.
    """
    if envelope.endpoint is Endpoint.COMPLETIONS:
        choice = {"index": 0, "text": delta.get("text", ""), "logprobs": None}
        choice.update(finish_reason=finish_reason, stop_reason=None)
        return envelope.wrap(envelope.endpoint.chunk_object, [choice])

    choice = {"index": 0, "delta": dict(delta), "logprobs": None}
    choice["finish_reason"] = finish_reason
    if finish_reason is not None:
        choice["stop_reason"] = None
    if "role" not in delta:
        choice["token_ids"] = None
    chunk = envelope.wrap(envelope.endpoint.chunk_object, [choice])
    if "role" in delta:
        chunk.update(prompt_token_ids=None, prompt_text=None)
    if finish_reason is not None:
        chunk["system_fingerprint"] = envelope.fingerprint
    return chunk


def usage_chunk(
    envelope: Envelope, token_usage: Mapping[str, int | None]
) -> dict[str, Any]:
    """The final streamed chunk sent when ``stream_options.include_usage``."""
    chunk = envelope.wrap(envelope.endpoint.chunk_object, [])
    chunk["usage"] = dict(token_usage)
    return chunk


def error_body(
    status: int, error_type: str, message: str, param: str | None = None
) -> dict[str, Any]:
    """vLLM's error envelope."""
    return {
        "error": {
            "message": message,
            "type": error_type,
            "param": param,
            "code": status,
        }
    }


def sse_event(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` or ``data: [DONE]``."""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()


def _completion_prompt(prompt: object) -> list[int]:
    if (
        isinstance(prompt, list)
        and len(prompt) == 1
        and isinstance(prompt[0], (str, list))
    ):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return text_token_ids(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("the stand-in engine takes one prompt per request")
    raise bad_request("prompt must be a string or a list of token ids")


def _chat_prompt(messages: object) -> tuple[list[int], int]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list")
    tokens: list[int] = []
    media = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{index}] must be an object with a role")
        tokens += text_token_ids(f"<|{message['role']}|>")
        content_tokens, content_media = _content(index, message.get("content"))
        tokens += content_tokens
        media += content_media
    tokens += text_token_ids("<|assistant|>")
    return tokens, media


def _content(index: int, content: object) -> tuple[list[int], int]:
    if content is None:
        return [], 0
    if isinstance(content, str):
        return text_token_ids(content), 0
    if not isinstance(content, list):
        raise bad_request(f"messages[{index}].content must be a string or a list")
    tokens: list[int] = []
    media = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            tokens += text_token_ids(part["text"])
        elif kind in _MEDIA_PARTS:
            tokens += media_token_ids(json.dumps(part.get(kind), sort_keys=True))
            media += 1
        else:
            raise bad_request(
                f"messages[{index}].content: unsupported part type {kind!r}"
            )
    return tokens, media


def _kv_params(raw: object) -> KVParams | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad_request("kv_transfer_params must be an object")
    do_remote_decode = bool(raw.get("do_remote_decode"))
    if not raw.get("do_remote_prefill"):
        return KVParams(do_remote_decode=do_remote_decode, remote=None)

    host, port, block_ids = (
        raw.get("remote_host"),
        raw.get("remote_port"),
        raw.get("remote_block_ids"),
    )
    if not isinstance(host, str) or not _is_int(port):
        raise bad_request("kv_transfer_params: remote_host and remote_port required")
    # vLLM 0.32's NixlConnector sends one list of block ids per KV cache group.
    if isinstance(block_ids, list) and all(isinstance(b, list) for b in block_ids):
        block_ids = [b for group in block_ids for b in group]
    if not isinstance(block_ids, list) or not all(_is_int(b) for b in block_ids):
        raise bad_request("kv_transfer_params: remote_block_ids must list integers")
    remote_id = raw.get("remote_request_id")
    remote = RemoteKV(
        host=host,
        port=port,
        block_ids=tuple(block_ids),
        request_id=str(remote_id) if remote_id is not None else None,
    )
    return KVParams(do_remote_decode=do_remote_decode, remote=remote)


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.")
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object")
    return bool(options.get("include_usage"))


def _optional_int(
    body: Mapping[str, Any], key: str, *, minimum: int | None
) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"{key} must be an integer")
    if minimum is not None and value < minimum:
        raise bad_request(f"{key} must be at least {minimum}, got {value}")
    return int(value)


def _optional_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be a boolean")
    return value


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{key} must be a string")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
