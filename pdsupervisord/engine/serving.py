"""``/v1/completions`` and ``/v1/chat/completions``, PD handoff included.

One request's path: validate, log ``request.received``, wait for a slot, pull
the KV from the producer when ``do_remote_prefill`` says so (the decode leg),
plan the deterministic completion, then answer in one JSON body or as
server-sent events. A prefill leg (``do_remote_decode``) leaves its KV blocks
with the engine child and answers with the ``kv_transfer_params`` a proxy
forwards to the decoder (facts §4).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from structlog.typing import FilteringBoundLogger

from pdsupervisord.engine.errors import EngineDeadError, KVTransferError, RequestError
from pdsupervisord.engine.generate import Completion, complete, kv_blocks
from pdsupervisord.engine.kvconfig import ConnectorKind
from pdsupervisord.engine.protocol import (
    Endpoint,
    Envelope,
    GenerationRequest,
    KVParams,
    RemoteKV,
    bad_request,
    completion_chunk,
    error_body,
    full_body,
    parse_request,
    resolve_max_tokens,
    sse_event,
    usage,
    usage_chunk,
)
from pdsupervisord.engine.state import STATE, ApiState

__all__ = ["error_response", "handle_chat", "handle_completions"]

_log: FilteringBoundLogger = structlog.get_logger("engine.api")


@dataclass(frozen=True)
class _Call:
    """One generation request being served."""

    state: ApiState
    request: GenerationRequest
    base_id: str
    model: str
    max_tokens: int
    blocks: tuple[str, ...]
    created: int

    @property
    def request_id(self) -> str:
        """vLLM's internal id: ``cmpl-<X-Request-Id>`` or ``chatcmpl-<...>``."""
        return f"{self.request.endpoint.id_prefix}-{self.base_id}"

    @property
    def envelope(self) -> Envelope:
        """The fields every answer and chunk of this request repeats."""
        return Envelope(
            self.request.endpoint,
            self.request_id,
            self.model,
            self.created,
            _fingerprint(self.state.settings.args.model),
        )


async def handle_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _handle(request, Endpoint.COMPLETIONS)


async def handle_chat(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _handle(request, Endpoint.CHAT)


def error_response(exc: RequestError) -> web.Response:
    """An OpenAI error answer."""
    body = error_body(exc.status, exc.error_type, str(exc), exc.param)
    return web.json_response(body, status=exc.status)


async def _handle(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    state = request.app[STATE]
    base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    try:
        call = _prepare(state, endpoint, await _json_body(request), base_id)
    except RequestError as exc:
        _log.info(
            "request.rejected",
            request_id=f"{endpoint.id_prefix}-{base_id}",
            status=exc.status,
            error=str(exc),
        )
        return error_response(exc)

    _log.info(
        "request.received",
        request_id=call.request_id,
        endpoint=request.path,
        prompt_tokens=len(call.request.prompt),
        media_parts=call.request.media_parts,
        max_tokens=call.max_tokens,
        stream=call.request.stream,
        kv_transfer=_kv_summary(call.request.kv),
    )
    try:
        async with state.scheduler.slot(len(call.blocks)):
            return await _serve(request, call)
    finally:
        state.request_served()


def _prepare(state: ApiState, endpoint: Endpoint, body: object, base_id: str) -> _Call:
    parsed = parse_request(endpoint, body)
    names = state.settings.args.served_model_names
    model = parsed.model or names[0]
    if model not in names:
        aliases = ", ".join(names)
        raise RequestError(
            404,
            "NotFoundError",
            f"The model `{model}` does not exist. Valid aliases: {aliases}.",
            param="model",
        )
    return _Call(
        state=state,
        request=parsed,
        base_id=base_id,
        model=model,
        max_tokens=resolve_max_tokens(parsed, state.settings.args.max_model_len),
        blocks=tuple(kv_blocks(parsed.prompt)),
        created=int(time.time()),
    )


async def _json_body(request: web.Request) -> object:
    try:
        return json.loads(await request.read())
    except ValueError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from exc


async def _serve(request: web.Request, call: _Call) -> web.StreamResponse:
    started = time.monotonic()
    kv = call.request.kv
    kv_config = call.state.settings.kv
    try:
        if kv and kv.remote and kv_config and kv_config.consumes:
            await _pull_remote_kv(call, kv.remote)
    except (KVTransferError, EngineDeadError) as exc:
        _log.error("request.failed", request_id=call.request_id, error=str(exc))
        error = RequestError(500, "InternalServerError", f"KV transfer failed: {exc}")
        return error_response(error)

    seed = call.request.seed
    completion = complete(
        call.request.prompt,
        seed if seed is not None else call.state.settings.args.seed,
        call.max_tokens,
        call.request.min_tokens,
        call.request.ignore_eos,
    )
    if call.request.stream:
        return await _stream(request, call, completion, started)
    return await _answer(call, completion, started)


async def _pull_remote_kv(call: _Call, remote: RemoteKV) -> None:
    # The producer keys its blocks by the id it was given; vLLM 0.11's proxy
    # protocol relies on the same X-Request-Id, newer ones send it explicitly.
    remote_id = remote.request_id or call.base_id
    blocks = await call.state.engine.pull_blocks(
        remote_id, remote.host, remote.port, remote.block_ids
    )
    if tuple(blocks) != call.blocks:
        raise KVTransferError(
            f"KV blocks pulled from {remote.host}:{remote.port} for request "
            f"{remote_id} do not match this request's prompt"
        )


async def _answer(call: _Call, completion: Completion, started: float) -> web.Response:
    _die_if_faulted(call, tokens_sent=None)
    kv_params = await _hold_kv(call)
    token_seconds = call.state.settings.knobs.token_seconds
    if token_seconds:
        await asyncio.sleep(token_seconds * len(completion.tokens))

    prefill_done = time.monotonic() - started
    gaps = [token_seconds] * (len(completion.tokens) - 1)
    _finish(call, completion, prefill_done + token_seconds, gaps, started)
    body = full_body(
        call.envelope,
        completion.text,
        completion.finish_reason,
        _usage(call, completion),
        kv_params,
    )
    return web.json_response(body)


async def _hold_kv(call: _Call) -> dict[str, Any] | None:
    kv, kv_config = call.request.kv, call.state.settings.kv
    channel = call.state.settings.side_channel
    if not (kv and kv.do_remote_decode and kv_config and kv_config.produces):
        return None
    if channel is None:  # never: settings give a producer its side channel
        return None

    tp = call.state.settings.args.tensor_parallel_size
    if kv_config.kind is not ConnectorKind.NIXL:
        block_ids = await call.state.engine.store_blocks(call.base_id, call.blocks)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": block_ids,
            "remote_engine_id": kv_config.engine_id,
            "remote_host": channel.host,
            "remote_port": channel.ports[0],
            "remote_tp_size": tp,
            "remote_request_id": call.base_id,
            "tp_size": tp,
        }

    # vLLM 0.32's NixlConnector, as measured: the blocks are keyed by vLLM's
    # internal request id (the answer's id plus a random suffix), block ids
    # come as one list per KV cache group, and there is no remote_tp_size.
    internal_id = f"{call.request_id}-{secrets.token_hex(4)}"
    block_ids = await call.state.engine.store_blocks(internal_id, call.blocks)
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [block_ids],
        "remote_engine_id": kv_config.engine_id,
        "remote_request_id": internal_id,
        "remote_host": channel.host,
        "remote_port": channel.ports[0],
        "tp_size": tp,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": len(call.request.prompt),
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
        "remote_prefill_cached_tokens": 0,
    }


async def _stream(
    request: web.Request, call: _Call, completion: Completion, started: float
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
    )
    await response.prepare(request)
    try:
        stamps = await _send_tokens(response, call, completion)
        if call.request.include_usage:
            chunk = usage_chunk(call.envelope, _usage(call, completion))
            await response.write(sse_event(chunk))
        await response.write(sse_event("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:
        _log.warning(
            "request.aborted", request_id=call.request_id, reason="client disconnected"
        )
        return response

    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    _finish(call, completion, stamps[0] - started, gaps, started)
    return response


async def _send_tokens(
    response: web.StreamResponse, call: _Call, completion: Completion
) -> list[float]:
    endpoint, token_seconds = (
        call.request.endpoint,
        call.state.settings.knobs.token_seconds,
    )
    if endpoint is Endpoint.CHAT:
        await response.write(_chunk(call, {"role": "assistant", "content": ""}, None))

    stamps: list[float] = []
    last = len(completion.tokens) - 1
    for index, token in enumerate(completion.tokens):
        _die_if_faulted(call, tokens_sent=index)
        if token_seconds:
            await asyncio.sleep(token_seconds)
        delta = {"content": token} if endpoint is Endpoint.CHAT else {"text": token}
        finish = completion.finish_reason if index == last else None
        await response.write(_chunk(call, delta, finish))
        stamps.append(time.monotonic())
    _die_if_faulted(call, tokens_sent=len(completion.tokens))
    return stamps


def _chunk(call: _Call, delta: dict[str, str], finish_reason: str | None) -> bytes:
    return sse_event(completion_chunk(call.envelope, delta, finish_reason))


def _die_if_faulted(call: _Call, tokens_sent: int | None) -> None:
    """Fault ``die_midstream``: exit hard after N streamed tokens, or at once.

    Args:
        tokens_sent: Tokens streamed so far; None for a non-streamed request.
    """
    limit = call.state.settings.faults.die_midstream
    if limit is None or (tokens_sent is not None and tokens_sent != limit):
        return
    _log.error(
        "fault.die_midstream",
        request_id=call.request_id,
        tokens_sent=tokens_sent,
        exit_code=1,
    )
    os._exit(1)


def _finish(
    call: _Call,
    completion: Completion,
    ttft: float,
    gaps: Sequence[float],
    started: float,
) -> None:
    e2e = time.monotonic() - started
    call.state.metrics.record_request(len(call.request.prompt), ttft, gaps, e2e)
    _log.info(
        "request.finished",
        request_id=call.request_id,
        finish_reason=completion.finish_reason,
        completion_tokens=len(completion.tokens),
        e2e_s=round(e2e, 4),
    )


def _usage(call: _Call, completion: Completion) -> dict[str, int | None]:
    return usage(len(call.request.prompt), len(completion.tokens))


def _fingerprint(model: str) -> str:
    """``system_fingerprint``: vLLM writes ``vllm-<version>-<hash>``."""
    return f"vllm-standin-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def _kv_summary(kv: KVParams | None) -> str | None:
    if kv is None:
        return None
    if kv.remote:
        return f"pull from {kv.remote.host}:{kv.remote.port}"
    return "hold for remote decode" if kv.do_remote_decode else None
