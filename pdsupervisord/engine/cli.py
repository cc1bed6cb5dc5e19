"""The ``vllm serve`` command line, as far as the stand-in engine uses it.

Real deployments pass dozens of flags; the stand-in reads the few that change
what a supervisor or proxy can observe and ignores the rest, so the argv of a
real deployment can be reused unchanged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ServeArgs", "parse_serve_args"]

PROG = "python -m pdsupervisord.engine"

#: Used when neither ``--max-model-len`` nor a model config gives one. A guess
#: at a typical small model's context; only request validation depends on it.
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class ServeArgs:
    """The parsed ``vllm serve`` flags the stand-in acts on.

    Attributes:
        model: Model path or name, as given to ``vllm serve``.
        served_model_names: Names accepted in the ``model`` field of requests.
        host: Address the API server binds.
        port: Port the API server binds.
        max_model_len: Longest prompt plus completion, in tokens.
        tensor_parallel_size: Number of tensor-parallel ranks.
        max_num_seqs: Requests run at once; the rest wait.
        seed: Default sampling seed.
        api_key: Bearer token required on ``/v1/*``, if any.
        kv_transfer_config: The ``--kv-transfer-config`` JSON object, if any.
        ignored: Flags the stand-in does not act on, for the start-up log.
        enable_request_id_headers: Whether answers carry ``X-Request-Id``
            (the request's, else a new one), as vLLM does only with this flag.
    """

    model: str
    served_model_names: tuple[str, ...]
    host: str
    port: int
    max_model_len: int
    tensor_parallel_size: int
    max_num_seqs: int
    seed: int
    api_key: str | None
    kv_transfer_config: Mapping[str, Any] | None
    ignored: tuple[str, ...]
    enable_request_id_headers: bool = False


def parse_serve_args(argv: Sequence[str], env: Mapping[str, str]) -> ServeArgs:
    """Parse ``serve MODEL [flags...]``.

    The model is taken from the word after ``serve`` when it is not a flag,
    else from ``--model``. Taking it by position, not through argparse, keeps
    the values of unknown flags (``--gpu-memory-utilization 0.9``) from being
    mistaken for the model.

    Args:
        argv: Arguments after the program name.
        env: Environment; ``VLLM_API_KEY`` is used when ``--api-key`` is absent,
            as vLLM does.

    Returns:
        The parsed arguments.

    Raises:
        SystemExit: With status 2 and a usage message, as argparse does, when
            the command is not ``serve``, no model is given or a value is bad.
    """
    parser = _build_parser()
    if not argv or argv[0] != "serve":
        parser.error("the only command is: serve MODEL [vllm serve flags...]")

    rest = list(argv[1:])
    positional = rest.pop(0) if rest and not rest[0].startswith("-") else None
    ns, unknown = parser.parse_known_args(rest)
    model = ns.model or positional
    if model is None:
        parser.error("a model is required: serve MODEL or --model MODEL")

    return ServeArgs(
        model=model,
        served_model_names=tuple(ns.served_model_name or [model]),
        host=ns.host,
        port=ns.port,
        max_model_len=ns.max_model_len or DEFAULT_MAX_MODEL_LEN,
        tensor_parallel_size=ns.tensor_parallel_size,
        max_num_seqs=ns.max_num_seqs,
        seed=ns.seed,
        api_key=ns.api_key or env.get("VLLM_API_KEY") or None,
        kv_transfer_config=ns.kv_transfer_config,
        ignored=tuple(unknown),
        enable_request_id_headers=ns.enable_request_id_headers,
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} serve",
        description="Stand-in for `vllm serve`: unknown vLLM flags are ignored.",
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--max-model-len", type=_token_count, default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    parser.add_argument("--max-num-seqs", type=_positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--kv-transfer-config", type=_json_object, default=None)
    parser.add_argument("--enable-request-id-headers", action="store_true")
    return parser


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _token_count(text: str) -> int:
    """Accept vLLM's human-readable lengths: ``40000``, ``32k``, ``1M``."""
    multipliers = {"k": 1000, "K": 1024, "m": 1_000_000, "M": 1024 * 1024}
    if text and text[-1] in multipliers:
        return _positive_int(text[:-1]) * multipliers[text[-1]]
    return _positive_int(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
