"""Everything the API server is configured with, read and checked at once.

Combines the ``vllm serve`` flags, the ``PDSD_ENGINE_*`` knobs, the fault
switches, the visible devices and the KV side channel's placement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pdsupervisord.engine.cli import ServeArgs, parse_serve_args
from pdsupervisord.engine.devices import visible_devices
from pdsupervisord.engine.errors import EngineConfigError
from pdsupervisord.engine.faults import Faults, parse_faults
from pdsupervisord.engine.knobs import Knobs, load_knobs
from pdsupervisord.engine.kvconfig import (
    ConnectorKind,
    KVTransferConfig,
    SideChannel,
    parse_kv_transfer_config,
    side_channel,
)

__all__ = ["Settings", "load_settings"]

#: vLLM 0.32's NixlConnector frees KV blocks no decoder read after this lease
#: (``kv_connector_extra_config.kv_lease_duration``); older connectors and
#: vllm-ascend's wait 120 s, the knob's default.
NIXL_KV_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class Settings:
    """The API server's whole configuration.

    Attributes:
        args: The ``vllm serve`` flags.
        knobs: The stand-in's timing and placement knobs.
        faults: The fault switches in force.
        devices: Device ids the engine child locks.
        kv: The KV transfer config, None without ``--kv-transfer-config``.
        side_channel: Where the engine child serves KV, None without a config.
    """

    args: ServeArgs
    knobs: Knobs
    faults: Faults
    devices: tuple[str, ...]
    kv: KVTransferConfig | None
    side_channel: SideChannel | None


def load_settings(argv: Sequence[str], env: Mapping[str, str]) -> Settings:
    """Read argv and the environment.

    Raises:
        SystemExit: Status 2, with a usage message, on a bad command line.
        EngineConfigError: On a bad knob, fault switch or KV config, or when
            fewer devices are visible than ``--tensor-parallel-size`` needs.
    """
    args = parse_serve_args(argv, env)
    devices = visible_devices(env)
    if devices and len(devices) < args.tensor_parallel_size:
        raise EngineConfigError(
            f"--tensor-parallel-size {args.tensor_parallel_size} needs as many "
            f"devices, but only {len(devices)} are visible: {','.join(devices)}"
        )

    kv = channel = None
    if args.kv_transfer_config is not None:
        kv = parse_kv_transfer_config(args.kv_transfer_config)
        channel = side_channel(kv, env, args.host, args.tensor_parallel_size)

    knobs = load_knobs(env)
    if kv is not None and kv.kind is ConnectorKind.NIXL:
        knobs = _nixl_lease(knobs, args.kv_transfer_config or {}, env)

    return Settings(
        args=args,
        knobs=knobs,
        faults=parse_faults(env),
        devices=devices,
        kv=kv,
        side_channel=channel,
    )


def _nixl_lease(knobs: Knobs, raw: Mapping[str, Any], env: Mapping[str, str]) -> Knobs:
    """NIXL's KV lease, unless ``PDSD_ENGINE_KV_TIMEOUT`` says otherwise."""
    if env.get("PDSD_ENGINE_KV_TIMEOUT", "").strip():
        return knobs
    extra = raw.get("kv_connector_extra_config")
    lease = extra.get("kv_lease_duration") if isinstance(extra, dict) else None
    if not isinstance(lease, int | float) or isinstance(lease, bool) or lease <= 0:
        lease = NIXL_KV_LEASE_SECONDS
    return replace(knobs, kv_timeout=float(lease))
