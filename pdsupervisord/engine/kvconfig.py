"""``--kv-transfer-config`` and where each connector's KV side channel listens.

Each real connector takes its listening port from a different place (facts §3),
and a supervisor has to get those right for two instances on one host not to
collide. The stand-in reproduces the placement rules, so a collision shows up
in a rehearsal the way it shows up on hardware:

- ``NixlConnector``: ``VLLM_NIXL_SIDE_CHANNEL_PORT`` (default 5600) on
  ``VLLM_NIXL_SIDE_CHANNEL_HOST``.
- LLMDataDist connectors: ``VLLM_ASCEND_LLMDD_RPC_PORT`` (default 5557). The
  pre-0.10.1 name ``VLLM_LLMDD_RPC_PORT`` is ignored, as upstream ignores it.
- Mooncake and any other connector: ``kv_port`` of the config (default 14579).

Every connector binds the range ``base + tp_rank`` for ``tp_rank`` in
``range(tensor_parallel_size)``. Data parallelism is not modelled: the
stand-in always runs as DP rank 0.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdsupervisord.engine.errors import EngineConfigError

__all__ = [
    "ConnectorKind",
    "KVRole",
    "KVTransferConfig",
    "SideChannel",
    "advertised_host",
    "parse_kv_transfer_config",
    "side_channel",
]

_NIXL_DEFAULT_PORT = 5600
_LLMDD_DEFAULT_PORT = 5557
_KV_PORT_DEFAULT = 14579
_ANY_ADDRESS = ("", "0.0.0.0", "::")


class KVRole(enum.Enum):
    """The ``kv_role`` of an instance."""

    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"


class ConnectorKind(enum.Enum):
    """Connector families that differ in how they place their side channel."""

    NIXL = "nixl"
    LLMDATADIST = "llmdatadist"
    MOONCAKE = "mooncake"
    OTHER = "other"


@dataclass(frozen=True)
class KVTransferConfig:
    """The parts of ``--kv-transfer-config`` the stand-in acts on.

    Attributes:
        connector: The ``kv_connector`` name, as given.
        kind: The connector family.
        role: The ``kv_role``.
        engine_id: The ``engine_id``; a random one when absent, as in vLLM.
        kv_port: The ``kv_port``, used by Mooncake and unknown connectors.
    """

    connector: str
    kind: ConnectorKind
    role: KVRole
    engine_id: str
    kv_port: int

    @property
    def produces(self) -> bool:
        """Whether this instance prefills for remote decoders."""
        return self.role in (KVRole.PRODUCER, KVRole.BOTH)

    @property
    def consumes(self) -> bool:
        """Whether this instance decodes from remotely prefilled KV."""
        return self.role in (KVRole.CONSUMER, KVRole.BOTH)


@dataclass(frozen=True)
class SideChannel:
    """Where the engine child serves KV blocks.

    Attributes:
        host: Address bound and advertised to decoders as ``remote_host``.
        ports: One port per tensor-parallel rank; ``ports[0]`` is advertised
            as ``remote_port``.
    """

    host: str
    ports: tuple[int, ...]


def parse_kv_transfer_config(raw: Mapping[str, Any]) -> KVTransferConfig:
    """Validate a ``--kv-transfer-config`` object.

    Raises:
        EngineConfigError: When ``kv_connector`` or ``kv_role`` is missing or
            invalid, ``kv_port`` is not a port, or an LLMDataDist connector is
            given ``kv_both`` (vllm-ascend rejects it).
    """
    connector = raw.get("kv_connector")
    if not isinstance(connector, str) or not connector:
        raise EngineConfigError("--kv-transfer-config: kv_connector is required")
    kind = _connector_kind(connector)

    try:
        role = KVRole(raw.get("kv_role"))
    except ValueError as exc:
        raise EngineConfigError(
            f"--kv-transfer-config: kv_role {raw.get('kv_role')!r} is not one of "
            "kv_producer, kv_consumer, kv_both"
        ) from exc
    if kind is ConnectorKind.LLMDATADIST and role is KVRole.BOTH:
        raise EngineConfigError(
            f"--kv-transfer-config: {connector} needs kv_role kv_producer or "
            "kv_consumer, not kv_both"
        )

    engine_id = raw.get("engine_id")
    kv_port = raw.get("kv_port")
    return KVTransferConfig(
        connector=connector,
        kind=kind,
        role=role,
        engine_id=str(engine_id) if engine_id is not None else str(uuid.uuid4()),
        kv_port=_port(
            "--kv-transfer-config kv_port",
            _KV_PORT_DEFAULT if kv_port is None else kv_port,
        ),
    )


def side_channel(
    config: KVTransferConfig, env: Mapping[str, str], api_host: str, tp_size: int
) -> SideChannel:
    """Work out the side channel's host and ports, as the real connector would.

    Raises:
        EngineConfigError: When a port variable is not a valid port.
    """
    if config.kind is ConnectorKind.NIXL:
        base = _port_env(env, "VLLM_NIXL_SIDE_CHANNEL_PORT", _NIXL_DEFAULT_PORT)
        own_host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST")
    elif config.kind is ConnectorKind.LLMDATADIST:
        base = _port_env(env, "VLLM_ASCEND_LLMDD_RPC_PORT", _LLMDD_DEFAULT_PORT)
        own_host = None
    else:
        base = config.kv_port
        own_host = None

    if base + tp_size - 1 > 65535:
        raise EngineConfigError(
            f"KV side channel ports {base}..{base + tp_size - 1} exceed 65535"
        )
    host = own_host or advertised_host(env, api_host)
    return SideChannel(host=host, ports=tuple(range(base, base + tp_size)))


def advertised_host(env: Mapping[str, str], api_host: str) -> str:
    """The address peers are told to reach this instance on.

    ``VLLM_HOST_IP``, else ``HCCL_IF_IP``, else ``--host`` unless that is a
    wildcard address, in which case loopback.
    """
    for name in ("VLLM_HOST_IP", "HCCL_IF_IP"):
        if env.get(name):
            return env[name]
    return "127.0.0.1" if api_host in _ANY_ADDRESS else api_host


def _connector_kind(connector: str) -> ConnectorKind:
    lowered = connector.lower()
    for kind in (ConnectorKind.NIXL, ConnectorKind.LLMDATADIST, ConnectorKind.MOONCAKE):
        if kind.value in lowered:
            return kind
    return ConnectorKind.OTHER


def _port_env(env: Mapping[str, str], name: str, default: int) -> int:
    return _port(name, env.get(name) or default)


def _port(what: str, value: object) -> int:
    try:
        port = int(str(value))
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise EngineConfigError(f"{what}={value!r} is not a port number")
    return port
