"""Ascend NPU hosts: the LLMDataDist rank table and the guide's NPU network checks.

The only module that runs ``hccn_tool`` and ``npu-smi`` or reads
``/etc/hccn.conf`` (all three paths come from ``[ascend]``). Two products:

* :func:`build_ranktable` / :func:`generate` -- ``ranktable.json`` in the
  format vllm-ascend's ``gen_ranktable.py`` writes (version 1.2, every value
  a string, prefill devices first, ``cluster_id`` 1-based across the table),
  for every slot of the topology. Unlike that script it never reuses a stale
  file, never writes an unreadable device IP, and reports every bad device
  at once.
* :func:`preflight` -- the guide's per-device checks (lldp, link, net_health,
  netdetect, gateway, ip, hccn.conf), one :class:`DeviceCheck` row each.

Which devices are this host's: a slot that lists ``device_ips`` describes
NPUs of another node, which cannot be queried from here; every other slot's
devices are this host's NPUs (the daemon starts every instance on its own
machine). Every call here blocks; run it in a thread from async code.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdsupervisord.config import AscendConfig, InstanceSlot, Topology
from pdsupervisord.errors import AscendError
from pdsupervisord.plan import InstanceSpec, engine_spec

__all__ = [
    "HOST_IP_ENV",
    "RANKTABLE_ENV",
    "DeviceCheck",
    "Member",
    "NpuTools",
    "build_ranktable",
    "generate",
    "local_devices",
    "members",
    "preflight",
    "ranktable_paths",
    "render_ranktable",
    "visible_devices",
    "write_if_changed",
]

#: Where LLMDataDist engines read the rank table from.
RANKTABLE_ENV = "DISAGGREGATED_PREFILL_RANK_TABLE_PATH"
#: vLLM's own address; the rank table's server_id must equal it.
HOST_IP_ENV = "VLLM_HOST_IP"

_USUAL_PATHS = {
    "hccn_tool": "/usr/local/Ascend/driver/tools/hccn_tool",
    "npu-smi": "/usr/local/sbin/npu-smi",
}


# --------------------------------------------------------------------------- #
# Running the tools.
# --------------------------------------------------------------------------- #


class NpuTools:
    """Runs the configured ``hccn_tool`` and ``npu-smi``; every call blocks.

    A missing program, a non-zero exit and a timeout all raise
    :class:`~pdsupervisord.errors.AscendError` naming the command.
    """

    def __init__(self, config: AscendConfig) -> None:
        self._config = config

    def hccn(self, device: int, option: str) -> str:
        """Return the output of ``hccn_tool -i DEVICE -OPTION -g``.

        Raises:
            AscendError: when the tool is missing, fails or times out.
        """
        return self._run(self._config.hccn_tool, "-i", str(device), f"-{option}", "-g")

    def npu_smi(self, *args: str) -> str:
        """Return the output of ``npu-smi ARGS``.

        Raises:
            AscendError: when the tool is missing, fails or times out.
        """
        return self._run(self._config.npu_smi, *args)

    def require_hccn(self) -> None:
        """Check that ``hccn_tool`` can be found before querying many devices.

        Raises:
            AscendError: when it cannot.
        """
        if shutil.which(self._config.hccn_tool) is None:
            raise AscendError([_missing(self._config.hccn_tool, "hccn_tool")])

    def _run(self, program: str, *args: str) -> str:
        shown = " ".join([Path(program).name, *args])
        try:
            done = subprocess.run(
                [program, *args],
                capture_output=True,
                text=True,
                timeout=self._config.tool_timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise AscendError([_missing(program, Path(program).name)]) from exc
        except subprocess.TimeoutExpired as exc:
            limit = self._config.tool_timeout
            raise AscendError([f"`{shown}` gave no answer within {limit:g} s"]) from exc
        except OSError as exc:
            raise AscendError([f"`{shown}` cannot run: {exc}"]) from exc
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            tail = f": {said[-1]}" if said else ""
            raise AscendError([f"`{shown}` failed (exit {done.returncode}){tail}"])
        return done.stdout


def _missing(program: str, tool: str) -> str:
    where = "on PATH" if "/" not in program else "there"
    key = "npu_smi" if tool == "npu-smi" else "hccn_tool"
    usual = _USUAL_PATHS.get(tool, "")
    return (
        f"{tool} not found ({program!r} is not {where}); set [ascend] {key} to "
        f"its path, usually {usual}"
    )


def _field(pattern: str, text: str) -> re.Match[str] | None:
    return re.search(pattern, text, re.MULTILINE | re.IGNORECASE)


def _usable_ipv4(value: str) -> bool:
    """An address a peer can reach: not ``-.-.-.-``, not ``0.0.0.0``."""
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_loopback)


# --------------------------------------------------------------------------- #
# Which devices each instance uses.
# --------------------------------------------------------------------------- #


def visible_devices(topo: Topology, spec: InstanceSpec) -> tuple[str, ...]:
    """The entries of the instance's device variable, as the engine sees them."""
    value = spec.env.get(topo.engine.devices_env, "")
    return tuple(entry.strip() for entry in value.split(",") if entry.strip())


@dataclass(frozen=True)
class Member:
    """One slot's devices as the rank table lists them.

    Attributes:
        name: The instance name, ``prefill-0``.
        role: ``prefill`` or ``decode``.
        server_id: ``VLLM_HOST_IP`` from its environment, else its host.
        devices: Physical device ids from its visible-device variable.
        slot: Its slot, with ``device_ips`` when on another node.
    """

    name: str
    role: str
    server_id: str
    devices: tuple[int, ...]
    slot: InstanceSlot


def members(topo: Topology) -> tuple[list[Member], list[str]]:
    """Every slot of both roles (declared and pool) in rank-table order.

    Returns:
        The members, and one problem message per slot that cannot be listed.
    """
    found: list[Member] = []
    problems: list[str] = []
    for role in (topo.prefill, topo.decode):
        for index, slot in enumerate(role.slots):
            spec = engine_spec(topo, role.role, index)
            member = _member(topo, spec, slot, problems)
            if member is not None:
                found.append(member)
    return found, problems


def _member(
    topo: Topology, spec: InstanceSpec, slot: InstanceSlot, problems: list[str]
) -> Member | None:
    server_id = spec.env.get(HOST_IP_ENV) or slot.host
    entries = visible_devices(topo, spec)
    before = len(problems)

    try:
        ipaddress.ip_address(server_id)
    except ValueError:
        problems.append(
            f"{spec.name}: server_id {server_id!r} is not an IP address; give the "
            f"instance an IP as host, or set {HOST_IP_ENV}"
        )
    if not entries:
        problems.append(
            f"{spec.name}: no devices ({topo.engine.devices_env} is not set), "
            "so it has no rank table entry"
        )
    if not all(entry.isdigit() for entry in entries):
        problems.append(
            f"{spec.name}: {topo.engine.devices_env}={','.join(entries)} is not "
            "a list of physical NPU ids"
        )
    if len(problems) > before:
        return None
    devices = tuple(int(entry) for entry in entries)
    return Member(spec.name, spec.role, server_id, devices, slot)


def local_devices(topo: Topology) -> tuple[int, ...]:
    """This host's NPUs the topology uses: slots without ``device_ips``.

    Instances whose device list cannot be read are left out;
    :func:`build_ranktable` reports them.
    """
    found, _ = members(topo)
    return tuple(sorted({d for m in found if not m.slot.device_ips for d in m.devices}))


# --------------------------------------------------------------------------- #
# The rank table.
# --------------------------------------------------------------------------- #


class _DeviceFacts:
    """Queries and caches this host's device IPs and A3 super pod ids."""

    def __init__(self, config: AscendConfig, tools: NpuTools) -> None:
        self._config = config
        self._tools = tools
        self._chips: int | None = None

    def device_ip(self, device: int) -> str:
        option, label = ("vnic", "vnic ipaddr") if self._a3 else ("ip", "ipaddr")
        output = self._tools.hccn(device, option)
        match = _field(rf"^\s*{label}\s*:\s*(\S*)", output)
        value = match[1] if match else output.strip()[:60]
        if match is None or not _usable_ipv4(value):
            raise AscendError(
                [
                    f"device {device}: `hccn_tool -i {device} -{option} -g` gave no "
                    f"usable address ({value!r}); its NPU NIC is not configured: "
                    f"hccn_tool -i {device} -ip -s address ADDR netmask MASK"
                ]
            )
        return value

    def super_ids(self, device: int) -> tuple[str, str]:
        """``(super_pod_id, super_device_id)`` from ``npu-smi ... spod-info``."""
        chips = self._chips_per_card()
        card, chip = divmod(device, chips)
        output = self._tools.npu_smi(
            "info", "-t", "spod-info", "-i", str(card), "-c", str(chip)
        )
        pod = _field(r"^\s*Super Pod ID\s*:\s*(\S+)", output)
        sdid = _field(r"^\s*SDID\s*:\s*(\S+)", output)
        if pod is None or sdid is None:
            raise AscendError(
                [
                    f"device {device}: `npu-smi info -t spod-info -i {card} -c {chip}` "
                    "shows no SDID or Super Pod ID"
                ]
            )
        return pod[1], sdid[1]

    @property
    def _a3(self) -> bool:
        return self._config.chip == "A3"

    def _chips_per_card(self) -> int:
        if self._chips is None:
            match = _field(
                r"^\s*Chip Count\s*:\s*(\d+)", self._tools.npu_smi("info", "-l")
            )
            if match is None or int(match[1]) < 1:
                raise AscendError(["`npu-smi info -l` shows no Chip Count"])
            self._chips = int(match[1])
        return self._chips


def build_ranktable(topo: Topology, tools: NpuTools | None = None) -> dict[str, Any]:
    """Build the rank table document for every slot of the topology.

    Device IPs come from ``hccn_tool`` for this host's devices and from
    ``device_ips`` for other nodes'; on A3 also ``super_pod_id`` and
    ``super_device_id`` (``npu-smi``, or the slot's keys). Blocks.

    Raises:
        AscendError: with every problem found: an unreadable device IP, a
            missing ``hccn.conf``, a tool failure, a slot without devices.
    """
    found, problems = members(topo)
    facts = _DeviceFacts(topo.ascend, tools or NpuTools(topo.ascend))
    if any(not member.slot.device_ips for member in found):
        problems += _hccn_conf_problems(topo.ascend.hccn_conf)

    lists: dict[str, list[dict[str, str]]] = {"prefill": [], "decode": []}
    for member in found:
        for position, device in enumerate(member.devices):
            try:
                entry = _entry(topo.ascend, facts, member, position, device)
            except AscendError as exc:
                problems += exc.problems
                continue
            lists[member.role].append(entry)

    if problems:
        raise AscendError(list(dict.fromkeys(problems)))
    return _document(lists["prefill"], lists["decode"])


def _hccn_conf_problems(path: Path) -> list[str]:
    if path.is_file():
        return []
    return [
        f"{path} does not exist: the NPU NICs of this host were never configured "
        "(hccn_tool -i N -ip -s address ADDR netmask MASK writes it); set "
        "[ascend] hccn_conf if it lives elsewhere"
    ]


def _entry(
    config: AscendConfig,
    facts: _DeviceFacts,
    member: Member,
    position: int,
    device: int,
) -> dict[str, str]:
    """One device's entry, keys in gen_ranktable.py's order (cluster_id later)."""
    entry = {"server_id": member.server_id, "device_id": str(device)}
    remote = member.slot.device_ips
    if remote and len(remote) != len(member.devices):
        raise AscendError(
            [
                f"{member.name}: {len(remote)} device_ips for "
                f"{len(member.devices)} visible devices"
            ]
        )
    entry["device_ip"] = remote[position] if remote else facts.device_ip(device)
    if config.chip == "A3":
        if remote:
            pod, sdid = _remote_super_ids(member, position)
        else:
            pod, sdid = facts.super_ids(device)
        entry.update(super_pod_id=pod, super_device_id=sdid)
    return entry


def _remote_super_ids(member: Member, position: int) -> tuple[str, str]:
    slot = member.slot
    if slot.super_pod_id is None or len(slot.super_device_ids) != len(member.devices):
        raise AscendError(
            [
                f"{member.name}: an A3 rank table needs super_pod_id and one "
                "super_device_ids entry per device for another node's NPUs"
            ]
        )
    return slot.super_pod_id, slot.super_device_ids[position]


def _document(
    prefill: list[dict[str, str]], decode: list[dict[str, str]]
) -> dict[str, Any]:
    for number, entry in enumerate(prefill + decode, start=1):
        entry["cluster_id"] = str(number)
    servers = dict.fromkeys(e["server_id"] for e in prefill + decode)
    return {
        "version": "1.2",
        "server_count": str(len(servers)),
        "prefill_device_list": prefill,
        "decode_device_list": decode,
        "status": "completed",
    }


def render_ranktable(table: dict[str, Any]) -> str:
    """The file's exact text: 4-space JSON, as gen_ranktable.py writes it."""
    return json.dumps(table, indent=4) + "\n"


def ranktable_paths(topo: Topology) -> tuple[Path, ...]:
    """Every distinct ``DISAGGREGATED_PREFILL_RANK_TABLE_PATH`` the plan exports.

    Relative paths are taken from the current directory, as the engines'
    would be.
    """
    paths: dict[Path, None] = {}
    for role in (topo.prefill, topo.decode):
        for index in range(len(role.slots)):
            value = engine_spec(topo, role.role, index).env.get(RANKTABLE_ENV)
            if value:
                paths[Path(value)] = None
    return tuple(paths)


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace ``path`` with ``text`` unless it already holds it.

    The new content goes to a temporary file in the same directory, is
    synced, then renamed over ``path``: a reader sees the old file or the
    new one, never half of either. An unchanged file is not touched at all
    (same inode, same mtime).

    Returns:
        Whether the file was written.

    Raises:
        AscendError: when the file cannot be read or written.
    """
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AscendError([f"cannot read the rank table {path}: {exc}"]) from exc
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, data)
    except OSError as exc:
        raise AscendError([f"cannot write the rank table {path}: {exc}"]) from exc
    return True


def _replace(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def generate(
    topo: Topology, output: Path | None = None, tools: NpuTools | None = None
) -> tuple[dict[str, Any], list[tuple[Path, bool]]]:
    """Build the rank table and write it where the engines will read it.

    Args:
        topo: The topology.
        output: Write here instead of every ``DISAGGREGATED_PREFILL_RANK_TABLE_PATH``.
        tools: The NPU tools to query (default: from ``[ascend]``).

    Returns:
        The table, and each path with whether it was (re)written.

    Raises:
        AscendError: when the table cannot be built or written, or there is
            nowhere to write it.
    """
    paths = (output,) if output is not None else ranktable_paths(topo)
    if not paths:
        raise AscendError(
            [f"no rank table path: pass -o PATH or set {RANKTABLE_ENV} in [env]"]
        )
    table = build_ranktable(topo, tools)
    text = render_ranktable(table)
    return table, [(path, write_if_changed(path, text)) for path in paths]


# --------------------------------------------------------------------------- #
# Pre-flight: the guide's NPU network checks.
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DeviceCheck:
    """One row of the pre-flight table.

    Attributes:
        device: The NPU id, or None for a check of the host (tool missing).
        check: ``lldp``, ``link``, ``net_health``, ``netdetect``, ``gateway``,
            ``ip``, ``vnic`` (A3), ``hccn.conf`` or ``hccn_tool``.
        ok: Whether it passed.
        detail: What the tool or file said.
        hint: How to fix a failure (empty when ok).
    """

    device: int | None
    check: str
    ok: bool
    detail: str
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``check --json`` form of this row."""
        return {
            "device": self.device,
            "check": self.check,
            "ok": self.ok,
            "detail": self.detail,
            "hint": self.hint,
        }


@dataclass(frozen=True)
class _Probe:
    """One ``hccn_tool -i N -OPTION -g`` check: the line to find, what passes."""

    check: str
    option: str
    pattern: str
    expect: str
    hint: str

    def passes(self, value: str) -> bool:
        if self.expect == "address":
            return _usable_ipv4(value)
        if self.expect == "any":
            return bool(value)
        return value.lower() == self.expect.lower()


_PROBES = (
    _Probe(
        "lldp",
        "lldp",
        r"^\s*Ifname\s*:\s*(\S.*?)\s*$",
        "any",
        "no switch port seen: check the port's cable and optical module "
        "(hccn_tool -i {d} -optical -g) and that the switch runs LLDP",
    ),
    _Probe(
        "link",
        "link",
        r"^\s*link status\s*:\s*(\S+)",
        "UP",
        "bring the port up: check the cable, the optical module "
        "(hccn_tool -i {d} -optical -g) and the switch port",
    ),
    _Probe(
        "net_health",
        "net_health",
        r"^\s*net health status\s*:\s*(.*?)\s*$",
        "Success",
        "the NPU cannot reach its detect address: fix netdetect and gateway, "
        "then the switch (hccn_tool -i {d} -netdetect -s address ADDR)",
    ),
    _Probe(
        "netdetect",
        "netdetect",
        r"^\s*netdetect address\s*:\s*(\S*)",
        "address",
        "set a reachable detect address: hccn_tool -i {d} -netdetect -s address ADDR",
    ),
    _Probe(
        "gateway",
        "gateway",
        r"^\s*default gateway\s*:\s*([^,\s]*)",
        "address",
        "set the gateway: hccn_tool -i {d} -gateway -s gateway ADDR",
    ),
    _Probe(
        "ip",
        "ip",
        r"^\s*ipaddr\s*:\s*(\S*)",
        "address",
        "configure the NIC: hccn_tool -i {d} -ip -s address ADDR netmask MASK",
    ),
)

_VNIC = _Probe(
    "vnic",
    "vnic",
    r"^\s*vnic ipaddr\s*:\s*(\S*)",
    "address",
    "the board's vNIC has no address: check the driver and hccn_tool -i {d} -vnic -g",
)


def preflight(
    topo: Topology,
    tools: NpuTools | None = None,
    devices: Sequence[int] | None = None,
) -> list[DeviceCheck]:
    """Run the guide's network checks on each of this host's NPUs; blocks.

    Args:
        topo: The topology; ``[ascend]`` names the tools and ``hccn.conf``.
        tools: The NPU tools to run (default: from ``[ascend]``).
        devices: Devices to check (default: :func:`local_devices`).

    Returns:
        One row per device and check, devices in order; a single failed
        ``hccn_tool`` row when the tool cannot be found.
    """
    tools = tools or NpuTools(topo.ascend)
    devices = local_devices(topo) if devices is None else devices
    try:
        tools.require_hccn()
    except AscendError as exc:
        return [DeviceCheck(None, "hccn_tool", False, exc.problems[0])]

    conf = _read_hccn_conf(topo.ascend.hccn_conf)
    probes = (*_PROBES, _VNIC) if topo.ascend.chip == "A3" else _PROBES
    # hccn_tool takes a fraction of a second per call; querying the devices
    # side by side keeps 16 NPUs x 7 checks within a few seconds.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(devices)))) as pool:
        rows = pool.map(
            lambda d: _device_rows(tools, probes, conf, topo.ascend.hccn_conf, d),
            devices,
        )
        return [row for device_rows in rows for row in device_rows]


def _device_rows(
    tools: NpuTools,
    probes: Iterable[_Probe],
    conf: dict[str, str] | None,
    conf_path: Path,
    device: int,
) -> list[DeviceCheck]:
    rows = [_probe(tools, probe, device) for probe in probes]
    ip = next(row for row in rows if row.check == "ip")
    live = ip.detail.partition(":")[2].strip() if ip.ok else None
    return [*rows, _conf_row(conf, conf_path, device, live)]


def _probe(tools: NpuTools, probe: _Probe, device: int) -> DeviceCheck:
    hint = probe.hint.format(d=device)
    try:
        output = tools.hccn(device, probe.option)
    except AscendError as exc:
        return DeviceCheck(device, probe.check, False, exc.problems[0], hint)
    match = _field(probe.pattern, output)
    if match is None:
        said = output.strip().splitlines()
        shown = f": {said[0]}" if said else " (no output)"
        detail = f"`hccn_tool -i {device} -{probe.option} -g` unexpected{shown}"
        return DeviceCheck(device, probe.check, False, detail, hint)
    ok = probe.passes(match[1])
    return DeviceCheck(device, probe.check, ok, match[0].strip(), "" if ok else hint)


def _read_hccn_conf(path: Path) -> dict[str, str] | None:
    """``address_0=...`` lines as a dict, or None when the file is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, _, value in pairs}


def _conf_row(
    conf: dict[str, str] | None, path: Path, device: int, live: str | None
) -> DeviceCheck:
    setting = f"hccn_tool -i {device} -ip -s address ADDR netmask MASK"
    if conf is None:
        hint = f"configure the NICs ({setting} writes it) or set [ascend] hccn_conf"
        return DeviceCheck(device, "hccn.conf", False, f"{path} does not exist", hint)
    address = conf.get(f"address_{device}")
    netmask = conf.get(f"netmask_{device}")
    if address is None or netmask is None:
        detail = f"no address_{device}/netmask_{device} in {path}"
        return DeviceCheck(device, "hccn.conf", False, detail, f"record it: {setting}")
    shown = f"address_{device}={address} netmask_{device}={netmask}"
    if live is not None and address != live:
        detail = f"address_{device}={address} but the NIC has {live}"
        hint = f"the NIC's address is what HCCL uses: correct {path} or {setting}"
        return DeviceCheck(device, "hccn.conf", False, detail, hint)
    return DeviceCheck(device, "hccn.conf", True, shown)
