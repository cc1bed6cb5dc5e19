"""The proxy's settings, as parsed from its command line and environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdsupervisord.proxy.backends import Address
from pdsupervisord.proxy.health import ProbeSettings

__all__ = ["ProxySettings"]


@dataclass(frozen=True)
class ProxySettings:
    """Everything the proxy needs to run; defaults are the CLI defaults.

    Attributes:
        host: address to listen on.
        port: port to listen on; 0 picks a free one (logged at start).
        prefill: prefillers in rotation at start (may be empty).
        decode: decoders in rotation at start (may be empty).
        max_retries: retries after a failed upstream attempt, per request.
        retry_delay: seconds before the first retry; doubles each retry.
        connect_timeout: seconds to open a connection to a backend.
        prefill_timeout: seconds for a whole prefill leg.
        read_timeout: seconds a decoder may stay silent (first byte included).
        eject_cooldown: seconds a backend that refused a connection is skipped.
        probes: active health probes of the backends.
        allow_decode_prefill_fallback: send to the decoder without
            ``kv_transfer_params`` when the prefiller returned none.
        served_model_name: model id for ``/v1/models`` when no decoder answers.
        max_request_bytes: largest accepted request body.
        admin_token: token guarding the membership API, or None.
        admin_token_optional: leave the membership API open when no token set.
        log_level: debug, info, warning, error or critical.
        event_loop: ``asyncio``, ``uvloop``, or ``auto`` (uvloop when installed).
        ignored_flags: example-proxy flags given but without effect here.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    prefill: tuple[Address, ...] = ()
    decode: tuple[Address, ...] = ()
    max_retries: int = 3
    retry_delay: float = 0.1
    connect_timeout: float = 5.0
    # Guesses: a long prompt's prefill on a busy instance can take minutes, and
    # a decoder may queue a request a long time before its first token. Lower
    # them when clients would rather get a 504 than wait.
    prefill_timeout: float = 600.0
    read_timeout: float = 600.0
    eject_cooldown: float = 5.0
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    allow_decode_prefill_fallback: bool = False
    served_model_name: str | None = None
    # Multimodal requests carry images inline as base64; 64 MiB is a guess.
    max_request_bytes: int = 64 * 1024 * 1024
    admin_token: str | None = field(default=None, repr=False)
    admin_token_optional: bool = False
    log_level: str = "info"
    event_loop: str = "asyncio"
    ignored_flags: tuple[str, ...] = ()
