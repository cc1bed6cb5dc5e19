"""Turn a :class:`~pdsupervisord.config.Topology` into exact instance commands.

Pure: no I/O, no clock. The same topology always gives the same argv and
environment, which is what lets the seed guide's commands be reproduced
token for token and compared in a test.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from pdsupervisord.config import PLACEHOLDER_RE, InstanceSlot, RoleConfig, Topology
from pdsupervisord.errors import PlanError

__all__ = [
    "Connector",
    "InstanceSpec",
    "Plan",
    "connector_for",
    "engine_spec",
    "initial_plan",
    "kv_port_base",
    "plan_to_json",
    "proxy_spec",
    "render_shell",
]

InstanceRole = Literal["prefill", "decode", "proxy"]


@dataclass(frozen=True)
class Connector:
    """What the planner must know about one KV connector family.

    Attributes:
        rpc_env: Environment variable that carries the instance's RPC or side
            channel port base, or None when the connector has none.
        needs_ranktable: Whether a rank table path must be exported.
        rpc_default: The base the engine falls back to when ``rpc_env`` is
            unset (two such instances on one host collide).
        prefill_roles: ``kv_role`` values it accepts for prefill (empty: any).
        decode_roles: ``kv_role`` values it accepts for decode (empty: any).
        devices_env: The variable that selects its devices, when it runs on
            one kind of accelerator only.
        unique_engine_id: Whether two instances must never share an
            ``engine_id``.
        kv_port_ranges: Whether each instance binds ``kv_port + dp_rank * tp +
            tp_rank``, so the plan gives each instance its own range and fills
            ``kv_connector_extra_config`` with both roles' dp and tp sizes.
        reserved_base: First port of the range its transfer engine picks
            random ports from (``npus_per_node * 1000`` ports long).
    """

    rpc_env: str | None = None
    needs_ranktable: bool = False
    rpc_default: int | None = None
    prefill_roles: tuple[str, ...] = ()
    decode_roles: tuple[str, ...] = ()
    devices_env: str | None = None
    unique_engine_id: bool = False
    kv_port_ranges: bool = False
    reserved_base: int | None = None


#: vLLM's KVTransferConfig default, the base of Mooncake ranges without kv_port.
DEFAULT_KV_PORT = 14579

_MOONCAKE = Connector(
    prefill_roles=("kv_producer",),
    decode_roles=("kv_consumer",),
    unique_engine_id=True,
    kv_port_ranges=True,
    reserved_base=20000,
)

# Matched by substring, first match wins. vllm-ascend's Mooncake store/pool
# connectors (MooncakeConnectorStoreV1, ...) do no P/D handoff and fall
# through to the generic strategy.
_CONNECTORS: tuple[tuple[str, Connector], ...] = (
    (
        "LLMDataDist",
        Connector(
            "VLLM_ASCEND_LLMDD_RPC_PORT",
            needs_ranktable=True,
            rpc_default=5557,
            prefill_roles=("kv_producer",),
            decode_roles=("kv_consumer",),
            devices_env="ASCEND_RT_VISIBLE_DEVICES",
        ),
    ),
    (
        "Nixl",
        Connector(
            "VLLM_NIXL_SIDE_CHANNEL_PORT",
            rpc_default=5600,
            prefill_roles=("kv_producer", "kv_both"),
            decode_roles=("kv_consumer", "kv_both"),
            devices_env="CUDA_VISIBLE_DEVICES",
            unique_engine_id=True,
        ),
    ),
    ("MooncakeConnectorV1", _MOONCAKE),
    ("MooncakeLayerwiseConnector", _MOONCAKE),
)


def connector_for(name: str | None) -> Connector:
    """Return the strategy for the connector called ``name`` (by family)."""
    for family, connector in _CONNECTORS:
        if name and family in name:
            return connector
    return Connector()


@dataclass(frozen=True)
class InstanceSpec:
    """Everything needed to start and reach one instance.

    Attributes:
        name: ``prefill-0``, ``decode-0``, ``proxy``.
        role: prefill, decode or proxy.
        index: Index within the role (0 for the proxy).
        argv: The exact command line.
        env: Only the variables the topology sets, in export order.
        host: Address the daemon and proxy use to reach the instance.
        port: HTTP port.
        devices: Device ids the instance owns.
        rpc_ports: KV RPC ports it binds (``base .. base + tp*dp - 1``).
        cpus: CPU cores the process tree is pinned to (empty: no pinning).
        startup_timeout: Seconds allowed from spawn to healthy.
    """

    name: str
    role: InstanceRole
    index: int
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    devices: tuple[int, ...] = ()
    rpc_ports: tuple[int, ...] = ()
    cpus: tuple[int, ...] = ()
    startup_timeout: float = 1800.0

    @property
    def address(self) -> str:
        """``host:port`` as the proxy's membership API names backends."""
        return f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        """The ``--print-plan --json`` form of this instance."""
        return {
            "name": self.name,
            "role": self.role,
            "argv": list(self.argv),
            "env": dict(self.env),
            "host": self.host,
            "port": self.port,
            "devices": list(self.devices),
            "cpus": list(self.cpus),
        }


@dataclass(frozen=True)
class Plan:
    """Instances in start order: prefill, decode, then the proxy."""

    instances: tuple[InstanceSpec, ...]

    def by_name(self, name: str) -> InstanceSpec:
        """Return the instance called ``name``.

        Raises:
            KeyError: when there is none.
        """
        for spec in self.instances:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _expand(
    tokens: Iterable[str], values: Mapping[str, str | Sequence[str]]
) -> list[str]:
    """Substitute placeholders; a token that is exactly a list placeholder
    expands to one token per element."""
    out: list[str] = []
    for token in tokens:
        whole = PLACEHOLDER_RE.fullmatch(token)
        if whole and isinstance(values.get(whole[1]), list | tuple):
            out.extend(values[whole[1]])
        else:
            out.append(PLACEHOLDER_RE.sub(partial(_scalar, values, token=token), token))
    return out


def _scalar(
    values: Mapping[str, str | Sequence[str]], match: re.Match[str], *, token: str
) -> str:
    value = values.get(match[1])
    if not isinstance(value, str):
        raise PlanError(f"placeholder {match[0]} cannot be used inside {token!r}")
    return value


def _kv_config(topo: Topology, role: RoleConfig, index: int) -> dict[str, Any]:
    """Build the ``--kv-transfer-config`` object, kv_role placed as vLLM docs do."""
    slot = role.slots[index]
    kv: dict[str, Any] = {}
    for key, value in topo.kv.items():
        kv[key] = value
        if key == "kv_buffer_device":
            kv["kv_role"] = role.kv_role
    kv.setdefault("kv_role", role.kv_role)
    if connector_for(topo.kv.get("kv_connector")).kv_port_ranges:
        kv["kv_port"] = kv_port_base(topo, role.role, index)
        kv["kv_connector_extra_config"] = _parallel_sizes(topo)
    elif slot.kv_port is not None:
        kv["kv_port"] = slot.kv_port
    if slot.engine_id is not None:
        kv["engine_id"] = slot.engine_id
    return kv


def engine_spec(topo: Topology, role_name: str, index: int) -> InstanceSpec:
    """Plan instance ``index`` of ``role_name`` in its slot.

    Raises:
        PlanError: when the role has no slot with that index.
    """
    role = topo.role(role_name)
    if not 0 <= index < len(role.slots):
        raise PlanError(f"{role_name} has no slot {index} ({len(role.slots)} slots)")
    slot = role.slots[index]
    name = f"{role_name}-{index}"
    values: dict[str, str | Sequence[str]] = {
        "python": sys.executable,
        "model": topo.model_path,
        "served_name": topo.served_name or topo.model_path,
        "tp": str(role.tp),
        "dp": str(role.dp),
        "host": topo.engine.host,
        "port": str(slot.port),
        "name": name,
        "index": str(index),
    }

    argv = _expand(topo.engine.command, values)
    argv += [topo.model_path, "--host", topo.engine.host, "--port", str(slot.port)]
    argv += _expand(role.args if role.args is not None else topo.engine.args, values)
    if topo.kv:
        kv = _kv_config(topo, role, index)
        argv += ["--kv-transfer-config", json.dumps(kv)]

    return InstanceSpec(
        name=name,
        role=role.role,
        index=index,
        argv=tuple(argv),
        env=_engine_env(topo, role, slot),
        host=slot.host,
        port=slot.port,
        devices=slot.devices,
        rpc_ports=_rpc_ports(role, slot),
        cpus=slot.cpus,
        startup_timeout=role.startup_timeout,
    )


def kv_port_base(topo: Topology, role_name: str, index: int) -> int | None:
    """First port of the instance's ``kv_port`` range, for ranged connectors.

    The instance's own ``kv_port`` wins; otherwise ranges are laid out one
    after the other from ``[kv] kv_port`` (vLLM's default when unset):
    prefill slots first, then decode slots, each ``tp * dp`` ports wide.
    Returns None when the connector does not bind a range per instance.

    Raises:
        PlanError: when a kv_port is not a port number.
    """
    if not connector_for(topo.kv.get("kv_connector")).kv_port_ranges:
        return None
    role = topo.role(role_name)
    own = role.slots[index].kv_port
    if own is not None:
        return _port_number(own)
    offset = index * role.tp * role.dp
    if role_name == "decode":
        prefill = topo.prefill
        offset += len(prefill.slots) * prefill.tp * prefill.dp
    return _port_number(topo.kv.get("kv_port", DEFAULT_KV_PORT)) + offset


def _port_number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PlanError(f"kv_port {value!r} is not a port number") from None


def _parallel_sizes(topo: Topology) -> dict[str, Any]:
    """``kv_connector_extra_config`` with each role's dp and tp from the topology.

    Other keys the operator wrote are kept; ``dp_size`` and ``tp_size`` always
    follow ``[prefill]`` and ``[decode]`` so they cannot drift apart.

    Raises:
        PlanError: when the operator's value (or its role entries) is no table.
    """
    extra = _table(topo.kv.get("kv_connector_extra_config"), "")
    for role in (topo.prefill, topo.decode):
        sizes = _table(extra.get(role.role), f".{role.role}")
        sizes.update(dp_size=role.dp, tp_size=role.tp)
        extra[role.role] = sizes
    return extra


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PlanError(f"kv_connector_extra_config{where} must be a table")
    return dict(value)


def _engine_env(topo: Topology, role: RoleConfig, slot: InstanceSlot) -> dict[str, str]:
    """Variables in the guide's export order: devices, common, RPC port, rest."""
    env: dict[str, str] = {}
    if slot.devices:
        env[topo.engine.devices_env] = ",".join(str(d) for d in slot.devices)
    env.update(topo.env)
    connector = connector_for(topo.kv.get("kv_connector"))
    if connector.rpc_env and slot.rpc_port is not None:
        env[connector.rpc_env] = str(slot.rpc_port)
    env.update(topo.engine.env)
    env.update(role.env)
    env.update(slot.env)
    return env


def _rpc_ports(role: RoleConfig, slot: InstanceSlot) -> tuple[int, ...]:
    """The ports an instance binds: ``base + dp_local_rank * tp + tp_rank``."""
    if slot.rpc_port is None:
        return ()
    return tuple(range(slot.rpc_port, slot.rpc_port + role.tp * role.dp))


def proxy_spec(
    topo: Topology, prefill: Sequence[InstanceSpec], decode: Sequence[InstanceSpec]
) -> InstanceSpec | None:
    """Plan the proxy for the given members, or None when there is no proxy."""
    proxy = topo.proxy
    if proxy.kind == "none":
        return None
    values: dict[str, str | Sequence[str]] = {
        "python": sys.executable,
        "model": topo.model_path,
        "served_name": topo.served_name or topo.model_path,
        "host": proxy.host,
        "port": str(proxy.port),
        "name": "proxy",
        "index": "0",
        "prefiller_hosts": [s.host for s in prefill],
        "prefiller_ports": [str(s.port) for s in prefill],
        "decoder_hosts": [s.host for s in decode],
        "decoder_ports": [str(s.port) for s in decode],
    }
    argv = _expand(proxy.command, values) + _expand(proxy.args, values)
    return InstanceSpec(
        name="proxy",
        role="proxy",
        index=0,
        argv=tuple(argv),
        env=dict(proxy.env),
        host=proxy.host,
        port=proxy.port,
        startup_timeout=proxy.startup_timeout,
    )


def initial_plan(topo: Topology) -> Plan:
    """Plan the instances the daemon starts with, in start order.

    Raises:
        PlanError: when a placeholder cannot be substituted.
    """
    prefill = [engine_spec(topo, "prefill", i) for i in range(topo.prefill.count)]
    decode = [engine_spec(topo, "decode", i) for i in range(topo.decode.count)]
    proxy = proxy_spec(topo, prefill, decode)
    return Plan(tuple(prefill + decode + ([proxy] if proxy else [])))


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The ``--print-plan --json`` document."""
    return {"instances": [spec.to_json() for spec in plan.instances]}


def render_shell(plan: Plan) -> str:
    """Render the plan as runnable shell, one block per instance."""
    blocks = []
    for spec in plan.instances:
        lines = [f"# {spec.name} ({spec.role}) on {spec.host}:{spec.port}"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()]
        argv = spec.argv
        if spec.cpus:
            # The daemon pins the process itself; taskset does the same by hand.
            cpus = ",".join(str(c) for c in spec.cpus)
            argv = ("taskset", "-c", cpus, *argv)
        lines.append(_wrap_command(argv))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _wrap_command(argv: Sequence[str]) -> str:
    """Join argv as shell, one option per continued line."""
    lines: list[list[str]] = [[]]
    for token in argv:
        if token.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(token))
    return " \\\n  ".join(" ".join(line) for line in lines)
