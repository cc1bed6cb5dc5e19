"""Topology checks that need more than the TOML file: host facts and connectors.

:mod:`pdsupervisord.config` rejects what a file alone shows to be wrong.
This module catches what only shows against the host and the KV connector,
each a mistake that otherwise surfaces minutes later, after a model load:
overlapping RPC or KV port ranges, the ignored ``VLLM_LLMDD_RPC_PORT``, a
loopback or foreign ``HCCL_IF_IP``, a missing socket interface, a wrong
``kv_role``, shared or miscounted devices, ports inside a connector's
reserved range, a missing rank table, shared engine ids. Every problem is
reported at once as a :class:`Finding` with the file, line and key it
concerns.

Errors and warnings: a check that depends on a host's facts (interface
names, addresses) is an error for instances on this host and a warning for
instances reached at an address this host does not have, since the topology
is then being planned for another machine. Checks that matter only to real
vLLM-Ascend (rank table, loopback ``HCCL_IF_IP``) are warnings when the
engine is the stand-in (``pdsupervisord.engine``).

:func:`prepare` is what the daemon runs before its first start.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import psutil
import structlog

from pdsupervisord import ascend
from pdsupervisord import config as config_module
from pdsupervisord.config import InstanceSlot, RoleConfig, Topology
from pdsupervisord.errors import AscendError, ConfigError, PlanError
from pdsupervisord.plan import Connector, InstanceSpec, connector_for, engine_spec
from pdsupervisord.plan import kv_port_base as plan_kv_port_base

__all__ = [
    "Finding",
    "HostFacts",
    "before_first_start",
    "existing_ranktable_findings",
    "has_errors",
    "load",
    "log_findings",
    "prepare",
    "probe_host",
    "ranktable_findings",
    "topology_findings",
]

log = structlog.get_logger("pdsupervisord.checks")

Severity = Literal["error", "warning"]

#: Socket interface variables, and whether a name matches by prefix.
IFNAME_VARS = {
    "GLOO_SOCKET_IFNAME": False,
    "TP_SOCKET_IFNAME": False,
    "HCCL_SOCKET_IFNAME": True,
    "NCCL_SOCKET_IFNAME": True,
}
DEPRECATED_RPC_ENV = "VLLM_LLMDD_RPC_PORT"
_STANDIN_NOTE = " (a warning only: the stand-in engine does not use it)"


@dataclass(frozen=True)
class Finding:
    """One problem found by a check.

    Attributes:
        severity: ``error`` (the daemon refuses to start) or ``warning``.
        key: Dotted key path it concerns, e.g. ``env.HCCL_IF_IP``.
        message: What is wrong and how to fix it.
        file: The topology file, when known.
        line: 1-based line of the key, when it is written in the file.
    """

    severity: Severity
    key: str
    message: str
    file: str = ""
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        prefix = f"{where}: " if where else ""
        key = f"{self.key}: " if self.key else ""
        return f"{prefix}{self.severity}: {key}{self.message}"

    def to_json(self) -> dict[str, Any]:
        """The ``check --json`` form of this finding."""
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "key": self.key,
            "message": self.message,
        }


def has_errors(findings: Iterable[Finding]) -> bool:
    """Whether any finding is an error."""
    return any(f.severity == "error" for f in findings)


# --------------------------------------------------------------------------- #
# Host facts, behind one small value so tests can describe any host.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class HostFacts:
    """What the checks need to know about the machine they run on.

    Attributes:
        interfaces: Interface name -> its IPv4/IPv6 addresses.
        default_ip: The IPv4 address of the default-route interface, which
            is the address vLLM takes as its own without ``VLLM_HOST_IP``.
    """

    interfaces: Mapping[str, tuple[str, ...]]
    default_ip: str | None = None

    @property
    def addresses(self) -> frozenset[str]:
        """Every address of every interface."""
        return frozenset(a for addrs in self.interfaces.values() for a in addrs)

    def is_local(self, host: str) -> bool:
        """Whether ``host`` names this machine (one of its addresses, loopback)."""
        if host in self.addresses or host == "localhost":
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or address.is_unspecified


def probe_host() -> HostFacts:
    """Read this machine's interfaces and default-route address; blocks briefly."""
    families = (socket.AF_INET, socket.AF_INET6)
    interfaces = {
        name: tuple(a.address.split("%")[0] for a in addrs if a.family in families)
        for name, addrs in psutil.net_if_addrs().items()
    }
    return HostFacts(interfaces, _default_route_ip(interfaces))


def _default_route_ip(interfaces: Mapping[str, tuple[str, ...]]) -> str | None:
    """The first IPv4 address of the interface holding the default route.

    vLLM asks the kernel which source address a packet to the outside world
    would get; reading the routing table gives the same answer without
    sending anything.
    """
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 1:
            for address in interfaces.get(fields[0], ()):
                if ":" not in address:
                    return address
    return None


# --------------------------------------------------------------------------- #
# What the checks look at: every slot, planned, with where its keys live.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _Instance:
    """One slot of a role, planned, and where its keys are in the file."""

    role: RoleConfig
    index: int
    slot: InstanceSlot
    spec: InstanceSpec
    local: bool

    @property
    def name(self) -> str:
        return self.spec.name

    def key(self, attribute: str) -> str:
        """Key path of a slot attribute (pool slots share the pool's lists)."""
        if not self.slot.from_pool:
            return f"{self.role.role}.instances[{self.index}].{attribute}"
        plural = {"port": "ports", "rpc_port": "rpc_ports", "devices": "devices"}
        return f"{self.role.role}.pool.{plural.get(attribute, attribute)}"


@dataclass
class _Context:
    topo: Topology
    host: HostFacts
    instances: list[_Instance]
    connector: Connector
    locate: Callable[[str], int | None]
    findings: list[Finding] = field(default_factory=list)

    @property
    def connector_name(self) -> str:
        return str(self.topo.kv.get("kv_connector", ""))

    @property
    def standin(self) -> bool:
        """Whether the engine is the stand-in, which has no NPUs or HCCL."""
        return any("pdsupervisord.engine" in t for t in self.topo.engine.command)

    def add(self, severity: Severity, key: str, message: str) -> None:
        finding = Finding(
            severity, key, message, str(self.topo.source), self.locate(key)
        )
        if finding not in self.findings:
            self.findings.append(finding)

    def env_key(
        self, instance: _Instance, name: str, fallback: str | None = None
    ) -> str:
        """The key that sets ``name`` for ``instance`` (the last layer wins).

        A variable no env table sets (the plan exports it) resolves to
        ``fallback``, else to the instance's host key.
        """
        if name in instance.slot.env:
            return f"{instance.key('env')}.{name}"
        if name in instance.role.env:
            return f"{instance.role.role}.env.{name}"
        if name in self.topo.engine.env:
            return f"engine.env.{name}"
        if name in self.topo.env:
            return f"env.{name}"
        return fallback or instance.key("host")


def _context(topo: Topology, host: HostFacts) -> _Context:
    try:
        text = topo.source.read_text(encoding="utf-8")
    except OSError:
        text = ""
    instances = [
        _Instance(
            role, i, slot, engine_spec(topo, role.role, i), host.is_local(slot.host)
        )
        for role in (topo.prefill, topo.decode)
        for i, slot in enumerate(role.slots)
    ]
    connector = connector_for(topo.kv.get("kv_connector"))
    return _Context(topo, host, instances, connector, config_module.key_lines(text))


def topology_findings(topo: Topology, host: HostFacts) -> list[Finding]:
    """Run every topology check against ``host``; pure apart from the file read.

    Covers all slots of both roles, pool slots included, since ``scale``
    may start any of them.

    Raises:
        PlanError: when an instance cannot be planned.
    """
    ctx = _context(topo, host)
    for check in _CHECKS:
        check(ctx)
    return ctx.findings


# --------------------------------------------------------------------------- #
# The checks, one function each.
# --------------------------------------------------------------------------- #


def _check_remote_hosts(ctx: _Context) -> None:
    remote: dict[str, list[_Instance]] = defaultdict(list)
    for instance in ctx.instances:
        if not instance.local:
            remote[instance.slot.host].append(instance)
    for host, instances in remote.items():
        names = ", ".join(i.name for i in instances)
        ctx.add(
            "warning",
            instances[0].key("host"),
            f"{host} ({names}) is not an address of this host: planning for "
            "another host, so its interface and address checks are warnings",
        )


def _check_deprecated_rpc_env(ctx: _Context) -> None:
    for instance in ctx.instances:
        if DEPRECATED_RPC_ENV in instance.spec.env:
            ctx.add(
                "error",
                ctx.env_key(instance, DEPRECATED_RPC_ENV),
                f"{DEPRECATED_RPC_ENV} is ignored since vllm-ascend v0.10.1, so "
                "instances fall back to port 5557 and collide; use rpc_port, "
                "which exports VLLM_ASCEND_LLMDD_RPC_PORT",
            )


def _check_hccl_if_ip(ctx: _Context) -> None:
    for instance in ctx.instances:
        value = instance.spec.env.get("HCCL_IF_IP")
        if value is None:
            continue
        key = ctx.env_key(instance, "HCCL_IF_IP")
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            ctx.add("error", key, f"HCCL_IF_IP {value!r} is not an IP address")
            continue

        if address.is_loopback:
            severity: Severity = "warning" if ctx.standin else "error"
            note = _STANDIN_NOTE if ctx.standin else ""
            ctx.add(
                severity,
                key,
                f"HCCL_IF_IP is {value}, a loopback address: HCCL cannot reach "
                "other NPUs through it (vllm-ascend #2399); set it to this "
                f"host's address on the NPU-reachable network{note}",
            )
        elif instance.local and value not in ctx.host.addresses:
            have = ", ".join(sorted(ctx.host.addresses))
            ctx.add(
                "error",
                key,
                f"HCCL_IF_IP {value} is not an address of this host (it has {have})",
            )


def _check_ifnames(ctx: _Context) -> None:
    names = sorted(ctx.host.interfaces)
    for instance in ctx.instances:
        for variable, by_prefix in IFNAME_VARS.items():
            value = instance.spec.env.get(variable)
            if value is None:
                continue
            for wanted in _ifname_entries(value):
                if _has_interface(names, wanted, by_prefix):
                    continue
                ctx.add(
                    "error" if instance.local else "warning",
                    ctx.env_key(instance, variable),
                    f"{variable} names {wanted}, which is not an interface of this "
                    f"host (it has {', '.join(names)})",
                )


def _ifname_entries(value: str) -> list[str]:
    """Interface names a ``*_SOCKET_IFNAME`` value requires (exclusions skipped)."""
    entries = [entry.strip() for entry in value.split(",")]
    return [e.lstrip("=") for e in entries if e and not e.startswith("^")]


def _has_interface(names: Iterable[str], wanted: str, by_prefix: bool) -> bool:
    return any(n == wanted or (by_prefix and n.startswith(wanted)) for n in names)


def _check_kv_roles(ctx: _Context) -> None:
    if not ctx.topo.kv:
        return
    for role, allowed in (
        (ctx.topo.prefill, ctx.connector.prefill_roles),
        (ctx.topo.decode, ctx.connector.decode_roles),
    ):
        if allowed and role.kv_role not in allowed:
            wanted = " or ".join(repr(value) for value in allowed)
            ctx.add(
                "error",
                f"{role.role}.kv_role",
                f"kv_role is {role.kv_role!r}, but {ctx.connector_name} needs "
                f"{wanted} for {role.role} instances",
            )


def _check_devices_env(ctx: _Context) -> None:
    wanted = ctx.connector.devices_env
    actual = ctx.topo.engine.devices_env
    if wanted is None or wanted == actual or not _any_devices(ctx):
        return
    ctx.add(
        "error",
        "engine.devices_env",
        f"{ctx.connector_name} selects its devices with {wanted}, but devices_env "
        f"is {actual}: the engines would ignore their device lists "
        "(vllm #20965, #25059)",
    )


def _any_devices(ctx: _Context) -> bool:
    return any(ascend.visible_devices(ctx.topo, i.spec) for i in ctx.instances)


def _check_devices(ctx: _Context) -> None:
    variable = ctx.topo.engine.devices_env
    owners: dict[tuple[str, str], str] = {}
    any_devices = _any_devices(ctx)
    for instance in ctx.instances:
        entries = ascend.visible_devices(ctx.topo, instance.spec)
        key = _devices_key(ctx, instance)
        if not entries:
            if any_devices:
                ctx.add(
                    "warning",
                    key,
                    f"{instance.name} sets no {variable}: it sees every device "
                    "of its host",
                )
            continue

        width = instance.role.tp * instance.role.dp
        if len(entries) != width:
            ctx.add(
                "error",
                key,
                f"{instance.name} sees {len(entries)} devices "
                f"({variable}={','.join(entries)}) but tensor_parallel_size x "
                f"data_parallel_size = {width}",
            )
        for entry in entries:
            owner = owners.setdefault((instance.slot.host, entry), instance.name)
            if owner != instance.name:
                ctx.add(
                    "error",
                    key,
                    f"device {entry} on {instance.slot.host} is visible to both "
                    f"{owner} and {instance.name}",
                )


def _devices_key(ctx: _Context, instance: _Instance) -> str:
    variable = ctx.topo.engine.devices_env
    return ctx.env_key(instance, variable, instance.key("devices"))


@dataclass(frozen=True)
class _Claim:
    """Ports an instance (or the proxy) binds, and the key that sets them."""

    host: str
    first: int
    last: int
    what: str
    key: str
    http: bool = False
    note: str = ""

    @property
    def described(self) -> str:
        """``prefill-0's kv_port range 30000-30001``."""
        span = (
            str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        )
        return f"{self.what} {span}{self.note}"

    def overlaps(self, low: int, high: int) -> bool:
        return self.first <= high and low <= self.last


def _claims(ctx: _Context) -> list[_Claim]:
    claims: list[_Claim] = []
    for instance in ctx.instances:
        host, name = instance.slot.host, instance.name
        port = instance.slot.port
        claims.append(
            _Claim(host, port, port, f"{name}'s HTTP port", instance.key("port"), True)
        )
        claims += _rpc_claim(ctx, instance) + _kv_claim(ctx, instance)
    proxy = ctx.topo.proxy
    if proxy.kind != "none":
        claims.append(
            _Claim(
                proxy.host,
                proxy.port,
                proxy.port,
                "the proxy's port",
                "proxy.port",
                True,
            )
        )
    return claims


def _rpc_claim(ctx: _Context, instance: _Instance) -> list[_Claim]:
    variable = ctx.connector.rpc_env
    if variable is None:
        return []
    value = instance.spec.env.get(variable)
    if value is None and ctx.connector.rpc_default is None:
        return []
    width = instance.role.tp * instance.role.dp
    what = f"{instance.name}'s {variable} range"
    note = ""
    if value is None:
        base = ctx.connector.rpc_default or 0
        note = " (unset: the default)"
        key = instance.key("rpc_port")
    elif value.isdigit():
        base = int(value)
        key = ctx.env_key(instance, variable, instance.key("rpc_port"))
    else:
        ctx.add(
            "error",
            ctx.env_key(instance, variable),
            f"{variable}={value!r} is not a port",
        )
        return []
    last = base + width - 1
    return [_Claim(instance.slot.host, base, last, what, key, note=note)]


def _kv_claim(ctx: _Context, instance: _Instance) -> list[_Claim]:
    base = plan_kv_port_base(ctx.topo, instance.role.role, instance.index)
    if base is None:
        return []
    width = instance.role.tp * instance.role.dp
    key = instance.key("kv_port") if instance.slot.kv_port is not None else "kv.kv_port"
    what = f"{instance.name}'s kv_port range"
    return [_Claim(instance.slot.host, base, base + width - 1, what, key)]


def _check_ports(ctx: _Context) -> None:
    by_host: dict[str, list[_Claim]] = defaultdict(list)
    for claim in _claims(ctx):
        by_host[claim.host].append(claim)
    for host, claims in by_host.items():
        for later_index, later in enumerate(claims):
            for earlier in claims[:later_index]:
                if (earlier.http and later.http) or not later.overlaps(
                    earlier.first, earlier.last
                ):
                    continue  # two HTTP ports: the topology loader reports those
                ctx.add(
                    "error",
                    earlier.key if later.http else later.key,
                    f"{later.described} overlaps {earlier.described} on {host}: "
                    "give each its own ports",
                )
    _check_reserved(ctx, [c for claims in by_host.values() for c in claims])


def _check_reserved(ctx: _Context, claims: list[_Claim]) -> None:
    base = ctx.connector.reserved_base
    if base is None:
        return
    npus = ctx.topo.ascend.npus_per_node
    last = base + npus * 1000 - 1
    for claim in claims:
        if claim.overlaps(base, last):
            ctx.add(
                "error",
                claim.key,
                f"{claim.described} lies in {base}-{last}, where "
                f"{ctx.connector_name}'s transfer engine binds random ports "
                f"({npus} NPUs per node x 1000; vllm-ascend #4725, #6455): it "
                "would fail now and then; move it out",
            )


def _check_ranktable_path(ctx: _Context) -> None:
    if not ctx.connector.needs_ranktable:
        return
    variable = ascend.RANKTABLE_ENV
    for instance in ctx.instances:
        value = instance.spec.env.get(variable)
        note = _STANDIN_NOTE if ctx.standin else ""
        if not value:
            ctx.add(
                "warning" if ctx.standin else "error",
                "env",
                f"{variable} is not set, and {ctx.connector_name} cannot start "
                "without a rank table: set it in [env] (pdsupervisord ranktable "
                f"-c FILE writes the file){note}",
            )
        elif not ctx.topo.ascend.generate_ranktable and not Path(value).exists():
            real = instance.local and not ctx.standin
            ctx.add(
                "error" if real else "warning",
                ctx.env_key(instance, variable),
                f"{variable} is {value}, which does not exist: run pdsupervisord "
                "ranktable -c FILE or set [ascend] generate_ranktable = true",
            )


def _check_engine_ids(ctx: _Context) -> None:
    if not ctx.connector.unique_engine_id:
        return
    owners: dict[str, _Instance] = {}
    for instance in ctx.instances:
        own = instance.slot.engine_id
        engine_id = own if own is not None else ctx.topo.kv.get("engine_id")
        if engine_id is None:
            continue
        engine_id = str(engine_id)
        key = instance.key("engine_id") if own is not None else "kv.engine_id"
        first = owners.setdefault(engine_id, instance)
        if first is not instance:
            ctx.add(
                "error",
                key,
                f"engine_id {engine_id!r} is shared by {first.name} and "
                f"{instance.name}: {ctx.connector_name} needs a unique one per "
                "instance; leave it unset and vLLM draws a fresh one at every start",
            )
        elif own is not None and instance.role.role == "prefill":
            ctx.add(
                "warning",
                key,
                f"engine_id {engine_id!r} of {instance.name} is fixed: after it "
                "restarts, decode instances keep using the KV addresses they "
                "cached under that id; leave it unset so each start gets a fresh one",
            )


def _check_parallel_sizes(ctx: _Context) -> None:
    if not ctx.connector.kv_port_ranges:
        return
    prefill, decode = ctx.topo.prefill, ctx.topo.decode
    if prefill.tp < decode.tp:
        ctx.add(
            "error",
            "prefill.tensor_parallel_size",
            f"prefill tensor_parallel_size {prefill.tp} is smaller than decode's "
            f"{decode.tp}: {ctx.connector_name} needs prefill tp >= decode tp",
        )
    extra = ctx.topo.kv.get("kv_connector_extra_config")
    if not isinstance(extra, dict):
        return
    for role in (prefill, decode):
        given = extra.get(role.role)
        if not isinstance(given, dict):
            continue
        for name, wanted in (("dp_size", role.dp), ("tp_size", role.tp)):
            if name in given and given[name] != wanted:
                ctx.add(
                    "warning",
                    "kv.kv_connector_extra_config",
                    f"kv_connector_extra_config.{role.role}.{name} is "
                    f"{given[name]!r} but [{role.role}] gives {wanted}; the plan "
                    f"uses {wanted}",
                )


_CHECKS: tuple[Callable[[_Context], None], ...] = (
    _check_remote_hosts,
    _check_deprecated_rpc_env,
    _check_hccl_if_ip,
    _check_ifnames,
    _check_kv_roles,
    _check_devices_env,
    _check_devices,
    _check_ports,
    _check_ranktable_path,
    _check_engine_ids,
    _check_parallel_sizes,
)


# --------------------------------------------------------------------------- #
# Rank table entries: will each instance find itself?
# --------------------------------------------------------------------------- #


def ranktable_findings(
    topo: Topology, table: Mapping[str, Any], host: HostFacts
) -> list[Finding]:
    """Check that every instance finds its own entry in ``table``.

    vLLM-Ascend looks for ``server_id`` equal to ``VLLM_HOST_IP`` (else the
    default-route address of its machine) and ``device_id`` in its visible
    devices, in its role's list; without a match the worker dies at start
    with "Can't read the target server_id". Instances reached at another
    host's address are assumed to get that address as their default route.
    """
    ctx = _context(topo, host)
    for instance in ctx.instances:
        entries = ascend.visible_devices(topo, instance.spec)
        server = _server_address(ctx, instance)
        if server is None:
            ctx.add(
                "warning",
                instance.key("host"),
                f"cannot tell which address vLLM will use for {instance.name} "
                f"(this host has no default route); set {ascend.HOST_IP_ENV}",
            )
            continue
        listed = {
            (str(e.get("server_id")), str(e.get("device_id")))
            for e in table.get(f"{instance.role.role}_device_list", ())
            if isinstance(e, Mapping)
        }
        missing = [d for d in entries if (server, d) not in listed]
        if missing:
            _add_missing_entry(ctx, instance, server, missing)
    return ctx.findings


def _server_address(ctx: _Context, instance: _Instance) -> str | None:
    own = instance.spec.env.get(ascend.HOST_IP_ENV)
    if own:
        return own
    return ctx.host.default_ip if instance.local else instance.slot.host


def _add_missing_entry(
    ctx: _Context, instance: _Instance, server: str, missing: list[str]
) -> None:
    variable = ascend.HOST_IP_ENV
    key = ctx.env_key(instance, variable)
    ctx.add(
        "error" if instance.local else "warning",
        key,
        f"{instance.name} will not find itself in the rank table: no "
        f"{instance.role.role}_device_list entry has server_id {server} and "
        f"device_id {','.join(missing)} (vLLM matches {variable}, else the "
        f"default-route address); give it host = {server!r} or set {variable}",
    )


# --------------------------------------------------------------------------- #
# What the daemon and the CLI run.
# --------------------------------------------------------------------------- #


def load(path: Path | str) -> tuple[Topology | None, list[Finding]]:
    """Load a topology, turning every loader error into an error finding."""
    try:
        return config_module.load(path), []
    except ConfigError as exc:
        return None, [
            Finding("error", i.key, i.message, i.file, i.line) for i in exc.issues
        ]


def prepare(
    topo: Topology,
    host: HostFacts | None = None,
    tools: ascend.NpuTools | None = None,
) -> list[Finding]:
    """Everything that must hold before the first start; blocks.

    Runs the topology checks; then, when they pass, writes the rank table
    (``[ascend] generate_ranktable``) or checks the existing one, and runs
    the NPU network pre-flight (``[ascend] preflight``).

    Returns:
        Every finding; the caller refuses to start when any is an error.
    """
    host = host or probe_host()
    try:
        findings = topology_findings(topo, host)
    except PlanError as exc:
        return [Finding("error", "", str(exc), str(topo.source))]
    if has_errors(findings):
        return findings

    if connector_for(topo.kv.get("kv_connector")).needs_ranktable:
        findings += _ranktable_step(topo, host, tools)
    elif topo.ascend.generate_ranktable:
        findings.append(
            Finding(
                "warning",
                "ascend.generate_ranktable",
                f"{topo.kv.get('kv_connector')} reads no rank table; none written",
                str(topo.source),
            )
        )
    if topo.ascend.preflight:
        findings += _preflight_step(topo, tools)
    return findings


def _ranktable_step(
    topo: Topology, host: HostFacts, tools: ascend.NpuTools | None
) -> list[Finding]:
    """Write the table when asked to, else read the existing one; check entries."""
    source = str(topo.source)
    if not topo.ascend.generate_ranktable:
        return existing_ranktable_findings(topo, host)
    try:
        table, written = ascend.generate(topo, tools=tools)
    except AscendError as exc:
        key = "ascend.generate_ranktable"
        return [Finding("error", key, p, source) for p in exc.problems]
    for path, changed in written:
        event = "ranktable.written" if changed else "ranktable.unchanged"
        log.info(event, path=str(path))
    return ranktable_findings(topo, table, host)


def existing_ranktable_findings(topo: Topology, host: HostFacts) -> list[Finding]:
    """Check the entries of every rank table file the plan points at that exists.

    A stale table left from another topology shows up here as instances
    that will not find themselves.
    """
    findings: list[Finding] = []
    for path in ascend.ranktable_paths(topo):
        if path.exists():
            findings += _existing_table(topo, host, path)
    return findings


def _existing_table(topo: Topology, host: HostFacts, path: Path) -> list[Finding]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        message = f"the rank table {path} cannot be read: {exc}"
        return [
            Finding("error", f"env.{ascend.RANKTABLE_ENV}", message, str(topo.source))
        ]
    if not isinstance(table, dict):
        message = f"the rank table {path} is not a JSON object"
        return [
            Finding("error", f"env.{ascend.RANKTABLE_ENV}", message, str(topo.source))
        ]
    return ranktable_findings(topo, table, host)


def _preflight_step(topo: Topology, tools: ascend.NpuTools | None) -> list[Finding]:
    findings = []
    for row in ascend.preflight(topo, tools):
        if not row.ok:
            device = "host" if row.device is None else f"device {row.device}"
            fix = f"; fix: {row.hint}" if row.hint else ""
            message = f"{device} {row.check}: {row.detail}{fix}"
            findings.append(
                Finding("error", "ascend.preflight", message, str(topo.source))
            )
    return findings


async def before_first_start(
    topo: Topology, host: HostFacts | None = None
) -> list[Finding]:
    """:func:`prepare` in a worker thread, for the daemon's event loop."""
    return await anyio.to_thread.run_sync(prepare, topo, host)


def log_findings(findings: Iterable[Finding]) -> bool:
    """Log each finding as ``preflight.error`` / ``preflight.warning``.

    Returns:
        Whether starting is allowed (no errors).
    """
    allowed = True
    for finding in findings:
        emit = log.error if finding.severity == "error" else log.warning
        emit(
            f"preflight.{finding.severity}",
            key=finding.key,
            file=finding.file,
            line=finding.line,
            message=finding.message,
        )
        allowed = allowed and finding.severity != "error"
    return allowed
