"""Load a TOML topology file into a typed, validated :class:`Topology`.

This is the only module that knows TOML key names. Every problem is collected
with the file, line and dotted key it concerns, and all of them are raised at
once in one :class:`~pdsupervisord.errors.ConfigError`; nothing downstream
ever sees a half-valid topology.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from pdsupervisord.errors import ConfigError, ConfigIssue

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "PLACEHOLDERS",
    "AscendConfig",
    "CheckConfig",
    "DaemonConfig",
    "EngineConfig",
    "InstanceSlot",
    "LogConfig",
    "ProbeConfig",
    "ProxyConfig",
    "RestartConfig",
    "RoleConfig",
    "Topology",
    "key_lines",
    "load",
    "loads",
]

Role = Literal["prefill", "decode"]
RestartPolicy = Literal["always", "on-failure", "never"]
ProxyKind = Literal["builtin", "external", "none"]

#: Placeholders allowed inside command and argument tokens, with their meaning.
PLACEHOLDERS = {
    "python": "the Python interpreter running the daemon",
    "model": "model.path",
    "served_name": "model.served_name",
    "tp": "the role's tensor_parallel_size",
    "dp": "the role's data_parallel_size",
    "host": "the instance's (or proxy's) bind host",
    "port": "the instance's (or proxy's) HTTP port",
    "name": "the instance name, e.g. prefill-0",
    "index": "the instance index within its role",
    "prefiller_hosts": "(proxy only) one token per prefill host",
    "prefiller_ports": "(proxy only) one token per prefill port",
    "decoder_hosts": "(proxy only) one token per decode host",
    "decoder_ports": "(proxy only) one token per decode port",
}
PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)\}")

#: Keys vLLM's KVTransferConfig accepts; anything else in [kv] is a typo.
KV_KEYS = (
    "kv_connector",
    "engine_id",
    "kv_buffer_device",
    "kv_buffer_size",
    "kv_role",
    "kv_rank",
    "kv_parallel_size",
    "kv_ip",
    "kv_port",
    "kv_connector_extra_config",
    "kv_connector_module_path",
    "kv_load_failure_policy",
)

DEFAULT_PROXY_ARGS = (
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--prefiller-hosts",
    "{prefiller_hosts}",
    "--prefiller-ports",
    "{prefiller_ports}",
    "--decoder-hosts",
    "{decoder_hosts}",
    "--decoder-ports",
    "{decoder_ports}",
)


@dataclass(frozen=True)
class DaemonConfig:
    """Where the daemon keeps its sockets, state and logs, and its timings."""

    run_dir: Path
    log_dir: Path
    control: str
    events: str
    stop_timeout: float = 30.0
    control_group: str | None = None
    allow_tcp_loopback: bool = False
    curve_secret_key: Path | None = None
    curve_authorized_keys: Path | None = None


@dataclass(frozen=True)
class ProbeConfig:
    """Kubernetes-style probes of each instance's ``/health``.

    Start-up: every ``startup_period`` until healthy or the role's
    ``startup_timeout``. Readiness: after start-up, every
    ``readiness_period``; ``readiness_failures`` failures in a row take the
    instance out of the proxy (state ``unready``) without restarting it, and
    ``readiness_successes`` in a row bring it back. Liveness: every
    ``liveness_period``; ``liveness_failures`` in a row restart it. Canary:
    every ``canary_period`` seconds (0 disables it) a one-token request goes
    through the proxy to each prefill/decode pair; a failing pair is reported
    as broken.
    """

    timeout: float = 2.0
    startup_period: float = 0.1
    readiness_period: float = 5.0
    readiness_failures: int = 1
    readiness_successes: int = 1
    liveness_period: float = 10.0
    liveness_failures: int = 3
    canary_period: float = 0.0
    canary_timeout: float = 30.0


@dataclass(frozen=True)
class LogConfig:
    """Per-instance log files: ``<log_dir>/<name>.log``, rotated by size."""

    max_bytes: int = 50 * 1024 * 1024
    backups: int = 5


@dataclass(frozen=True)
class CheckConfig:
    """Pre-start checks run before every start of an engine.

    ``device_command``, when set, runs once per device with ``{device}``
    substituted; exit status 0 means the device is free, anything else means
    it is held, and its output is shown as the reason (e.g. a wrapper around
    an ``npu-smi`` process query).
    """

    ports: bool = True
    devices: bool = True
    device_command: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineConfig:
    """How an engine (``vllm serve``) is launched; shared by both roles."""

    command: tuple[str, ...] = ("vllm", "serve")
    host: str = "0.0.0.0"
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    devices_env: str = "ASCEND_RT_VISIBLE_DEVICES"


@dataclass(frozen=True)
class InstanceSlot:
    """Where one instance of a role can run: address, devices and ports."""

    host: str
    port: int
    devices: tuple[int, ...]
    rpc_port: int | None = None
    kv_port: int | str | None = None
    engine_id: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: tuple[int, ...] = ()
    from_pool: bool = False
    device_ips: tuple[str, ...] = ()
    super_device_ids: tuple[str, ...] = ()
    super_pod_id: str | None = None


@dataclass(frozen=True)
class RoleConfig:
    """One role (prefill or decode): its slots, counts and per-role settings.

    ``slots`` lists the declared instances first, then the pool's slots; an
    instance with index ``i`` always runs in ``slots[i]``.
    """

    role: Role
    slots: tuple[InstanceSlot, ...]
    count: int
    min: int
    max: int
    tp: int = 1
    dp: int = 1
    kv_role: str = ""
    args: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout: float = 1800.0


@dataclass(frozen=True)
class ProxyConfig:
    """The PD proxy: the built-in one, an external command, or none."""

    kind: ProxyKind = "builtin"
    host: str = "127.0.0.1"
    port: int = 8080
    command: tuple[str, ...] = ("{python}", "-m", "pdsupervisord.proxy")
    args: tuple[str, ...] = DEFAULT_PROXY_ARGS
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout: float = 60.0


@dataclass(frozen=True)
class RestartConfig:
    """Restart policy, backoff and crash-loop limit, shared by all instances."""

    policy: RestartPolicy = "always"
    success_exit_codes: tuple[int, ...] = ()
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 60.0
    max_restarts: int = 5
    restart_window: float = 300.0
    stable_after: float = 60.0


@dataclass(frozen=True)
class AscendConfig:
    """Ascend NPU hosts: where the NPU tools are, rank table and pre-flight.

    ``chip`` selects how device IPs are read: ``A2`` from ``hccn_tool -ip``,
    ``A3`` from ``hccn_tool -vnic`` plus ``super_pod_id``/``super_device_id``
    from ``npu-smi``. ``generate_ranktable`` and ``preflight`` make the daemon
    write the rank table and run the NPU network checks before its first
    start. ``npus_per_node`` sizes the Mooncake transfer engine's port range.
    """

    chip: Literal["A2", "A3"] = "A2"
    hccn_tool: str = "hccn_tool"
    npu_smi: str = "npu-smi"
    hccn_conf: Path = Path("/etc/hccn.conf")
    generate_ranktable: bool = False
    preflight: bool = False
    npus_per_node: int = 8
    tool_timeout: float = 10.0


@dataclass(frozen=True)
class Topology:
    """A validated topology: everything the planner and supervisor need."""

    source: Path
    daemon: DaemonConfig
    model_path: str
    served_name: str | None
    engine: EngineConfig
    env: Mapping[str, str]
    kv: Mapping[str, Any]
    prefill: RoleConfig
    decode: RoleConfig
    proxy: ProxyConfig
    restart: RestartConfig
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    logs: LogConfig = field(default_factory=LogConfig)
    checks: CheckConfig = field(default_factory=CheckConfig)
    ascend: AscendConfig = field(default_factory=AscendConfig)

    def role(self, role: str) -> RoleConfig:
        """Return the config of ``role`` ("prefill" or "decode").

        Raises:
            KeyError: for any other role name.
        """
        if role == "prefill":
            return self.prefill
        if role == "decode":
            return self.decode
        raise KeyError(role)


# --------------------------------------------------------------------------- #
# Locating keys: tomllib gives values but no positions, so we index the lines.
# --------------------------------------------------------------------------- #

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


class _Locator:
    """Maps dotted key paths (``prefill.instances[0].port``) to line numbers.

    A line scan, not a parser: keys inside inline tables and multi-line arrays
    resolve to the line of their enclosing key, which is where an operator
    would look anyway.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        array_counts: dict[str, int] = {}
        prefix = ""
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER_RE.match(line)
            if header:
                prefix = self._header_path(header, array_counts)
                self._lines.setdefault(prefix, number)
                continue
            key = _KEY_RE.match(line)
            if key and not line.lstrip().startswith("#"):
                name = ".".join(p.strip().strip("\"'") for p in key[1].split("."))
                path = f"{prefix}.{name}" if prefix else name
                self._lines.setdefault(path, number)

    @staticmethod
    def _header_path(header: re.Match[str], array_counts: dict[str, int]) -> str:
        path = ".".join(p.strip().strip("\"'") for p in header[2].split("."))
        if header[1] != "[[":
            return path
        index = array_counts.get(path, 0)
        array_counts[path] = index + 1
        return f"{path}[{index}]"

    def line(self, path: str) -> int | None:
        """Return the line of ``path`` or of its nearest located ancestor."""
        while path:
            if path in self._lines:
                return self._lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None


# --------------------------------------------------------------------------- #
# Reading tables with type checks, collecting every issue.
# --------------------------------------------------------------------------- #

_T = TypeVar("_T")
_MISSING: Any = object()


class _Table:
    """A view of one TOML table that type-checks keys and records issues."""

    def __init__(self, ctx: _Context, data: Mapping[str, Any], path: str) -> None:
        self._ctx = ctx
        self._data = data
        self.path = path
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self._ctx.error(self.key_path(key), message)

    def has(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def get(
        self,
        key: str,
        check: Callable[[Any], bool],
        expected: str,
        default: _T = _MISSING,
    ) -> _T:
        """Return ``key`` when ``check`` accepts it, else record an issue.

        A missing key without a default, and a value of the wrong type, are
        recorded and ``default`` (or None) is returned so that validation can
        go on and report further problems.
        """
        self._used.add(key)
        if key not in self._data:
            if default is _MISSING:
                self.error(key, f"required key is missing ({expected})")
                return None  # type: ignore[return-value]
            return default
        value = self._data[key]
        if not check(value):
            self.error(key, f"expected {expected}, got {_describe(value)}")
            return default if default is not _MISSING else None  # type: ignore[return-value]
        return value  # type: ignore[no-any-return]

    def text(self, key: str, default: _T = _MISSING) -> str | _T:
        return self.get(key, lambda v: isinstance(v, str), "a string", default)

    def integer(self, key: str, default: _T = _MISSING, minimum: int = 0) -> int | _T:
        value = self.get(key, _is_int, "an integer", default)
        if isinstance(value, int) and value < minimum:
            self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def port(self, key: str, default: _T = _MISSING) -> int | _T:
        value = self.get(key, _is_int, "a port number", default)
        if isinstance(value, int) and not 1 <= value <= 65535:
            self.error(key, f"port must be in 1..65535, got {value}")
        return value

    def seconds(self, key: str, default: _T = _MISSING) -> float | _T:
        value = self.get(key, _is_number, "a number of seconds", default)
        if isinstance(value, int | float) and value < 0:
            self.error(key, f"must not be negative, got {value}")
        return float(value) if isinstance(value, int | float) else value

    def str_list(self, key: str, default: _T = _MISSING) -> tuple[str, ...] | _T:
        value = self.get(key, _is_str_list, "a list of strings", default)
        return tuple(value) if isinstance(value, list) else value

    def int_list(self, key: str, default: _T = _MISSING) -> tuple[int, ...] | _T:
        value = self.get(key, _is_int_list, "a list of integers", default)
        return tuple(value) if isinstance(value, list) else value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        if value not in choices:
            self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def env(self, key: str) -> dict[str, str]:
        """Read an environment table; values may be strings, numbers or bools."""
        raw: dict[str, Any] = self.get(
            key, lambda v: isinstance(v, dict), "a table", {}
        )
        env: dict[str, str] = {}
        for name, value in raw.items():
            if isinstance(value, bool):
                env[name] = "true" if value else "false"
            elif isinstance(value, str | int | float):
                env[name] = str(value)
            else:
                self._ctx.error(
                    f"{self.key_path(key)}.{name}",
                    f"environment values must be strings or numbers, "
                    f"got {_describe(value)}",
                )
        return env

    def table(self, key: str, required: bool = False) -> _Table:
        default = _MISSING if required else {}
        raw = self.get(key, lambda v: isinstance(v, dict), "a table", default)
        return _Table(self._ctx, raw or {}, self.key_path(key))

    def tables(self, key: str) -> list[_Table]:
        raw: list[dict[str, Any]] = self.get(
            key, _is_table_list, "an array of tables", []
        )
        return [
            _Table(self._ctx, item, f"{self.key_path(key)}[{i}]")
            for i, item in enumerate(raw)
        ]

    def check_unknown(self) -> None:
        """Record every key nobody asked for, suggesting the nearest valid one."""
        for key in self._data:
            if key in self._used:
                continue
            close = difflib.get_close_matches(key, sorted(self._used), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(self._used))
            self.error(key, f"unknown key{hint} (valid keys: {valid})")


@dataclass
class _Context:
    file: str
    locator: _Locator
    issues: list[ConfigIssue] = field(default_factory=list)

    def error(self, path: str, message: str) -> None:
        self.issues.append(
            ConfigIssue(self.file, self.locator.line(path), path, message)
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, dict | list) else kind


# --------------------------------------------------------------------------- #
# The sections.
# --------------------------------------------------------------------------- #


def _read_daemon(top: _Table, source: Path) -> DaemonConfig:
    t = top.table("daemon")
    run_dir = _resolve(source, t.text("run_dir", "/run/pdsupervisord"))
    log_dir = _resolve(source, t.text("log_dir", str(run_dir / "log")))
    config = DaemonConfig(
        run_dir=run_dir,
        log_dir=log_dir,
        control=t.text("control", f"ipc://{run_dir}/control.sock"),
        events=t.text("events", f"ipc://{run_dir}/events.sock"),
        stop_timeout=t.seconds("stop_timeout", 30.0),
        control_group=t.text("control_group", None),
        allow_tcp_loopback=t.get(
            "allow_tcp_loopback", lambda v: isinstance(v, bool), "true or false", False
        ),
        curve_secret_key=_optional_path(source, t.text("curve_secret_key", None)),
        curve_authorized_keys=_optional_path(
            source, t.text("curve_authorized_keys", None)
        ),
    )
    if (config.curve_secret_key is None) != (config.curve_authorized_keys is None):
        t.error(
            "curve_secret_key",
            "CurveZMQ needs both curve_secret_key and curve_authorized_keys",
        )
    for key in ("control", "events"):
        endpoint = getattr(config, key)
        if not endpoint.startswith(("ipc://", "tcp://")):
            t.error(key, f"must be an ipc:// or tcp:// endpoint, got {endpoint!r}")
        elif endpoint.startswith("tcp://") and config.curve_secret_key is None:
            host = endpoint.removeprefix("tcp://").rpartition(":")[0]
            loopback = host in ("127.0.0.1", "localhost", "[::1]")
            if not (loopback and config.allow_tcp_loopback):
                t.error(
                    key,
                    f"{endpoint} has no authentication: set curve_secret_key and "
                    "curve_authorized_keys (CurveZMQ), or use tcp://127.0.0.1 "
                    "with allow_tcp_loopback = true",
                )
    t.check_unknown()
    return config


def _non_empty(t: _Table, key: str) -> str:
    value = t.text(key)
    if isinstance(value, str) and not value.strip():
        t.error(key, "must not be empty")
    if isinstance(value, str) and value.startswith("~"):
        return str(Path(value).expanduser())  # a local path, not a hub name
    return value


def _optional_path(source: Path, value: str | None) -> Path | None:
    return None if value is None else _resolve(source, value)


def _resolve(source: Path, value: str) -> Path:
    """Resolve a path relative to the directory of the topology file."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (source.parent / path).resolve()


def _read_engine(top: _Table) -> EngineConfig:
    t = top.table("engine")
    config = EngineConfig(
        command=t.str_list("command", ("vllm", "serve")),
        host=t.text("host", "0.0.0.0"),
        args=t.str_list("args", ()),
        env=t.env("env"),
        devices_env=t.text("devices_env", "ASCEND_RT_VISIBLE_DEVICES"),
    )
    if not config.command:
        t.error("command", "must name at least the program to run")
    _check_placeholders(t, "command", config.command)
    _check_placeholders(t, "args", config.args)
    t.check_unknown()
    return config


def _check_placeholders(t: _Table, key: str, tokens: tuple[str, ...]) -> None:
    for token in tokens:
        for name in PLACEHOLDER_RE.findall(token):
            if name not in PLACEHOLDERS:
                close = difflib.get_close_matches(name, list(PLACEHOLDERS), n=1)
                hint = f"; did you mean {{{close[0]}}}?" if close else ""
                t.error(key, f"unknown placeholder {{{name}}}{hint}")


def _read_kv(top: _Table) -> dict[str, Any]:
    t = top.table("kv")
    kv: dict[str, Any] = {}
    for key in t.keys():  # noqa: SIM118 - _Table is not a dict  # file order, so the JSON reads like the operator wrote it
        if key in KV_KEYS:
            kv[key] = t.get(key, lambda _: True, "a value")
    for key in KV_KEYS:
        t.get(key, lambda _: True, "a value", None)  # mark as valid for suggestions
    if "kv_role" in kv:
        t.error("kv_role", "set kv_role per role ([prefill] / [decode] kv_role)")
    t.check_unknown()
    return kv


def _read_slot(t: _Table, default_host: str) -> InstanceSlot:
    devices = t.int_list("devices", ())
    slot = InstanceSlot(
        host=t.text("host", default_host),
        port=t.port("port"),
        devices=devices,
        rpc_port=t.port("rpc_port", None),
        kv_port=t.get(
            "kv_port", lambda v: _is_int(v) or isinstance(v, str), "a port", None
        ),
        engine_id=t.text("engine_id", None),
        env=t.env("env"),
        cpus=t.int_list("cpus", ()),
        device_ips=t.str_list("device_ips", ()),
        super_device_ids=t.str_list("super_device_ids", ()),
        super_pod_id=t.text("super_pod_id", None),
    )
    _check_device_ips(t, slot)
    t.check_unknown()
    return slot


def _read_pool(t: _Table, host: str, tp: int, dp: int) -> list[InstanceSlot]:
    """Expand a pool table into slots: one port, rpc_port and tp*dp devices each."""
    host = t.text("host", host)
    ports = t.int_list("ports", ())
    devices = t.int_list("devices", ())
    rpc_ports = t.int_list("rpc_ports", ())
    t.check_unknown()

    width = tp * dp
    size = len(ports)
    if devices and len(devices) != size * width:
        t.error(
            "devices",
            f"{len(ports)} pool ports need {size * width} devices "
            f"({width} per instance), got {len(devices)}",
        )
    if rpc_ports and len(rpc_ports) != size:
        t.error("rpc_ports", f"need one RPC port per pool port ({size})")
    return [
        InstanceSlot(
            host=host,
            port=port,
            devices=tuple(devices[i * width : (i + 1) * width]),
            rpc_port=rpc_ports[i] if i < len(rpc_ports) else None,
            from_pool=True,
        )
        for i, port in enumerate(ports)
    ]


def _read_role(top: _Table, role: Role) -> RoleConfig:
    t = top.table(role, required=True)
    tp = t.integer("tensor_parallel_size", 1, minimum=1)
    dp = t.integer("data_parallel_size", 1, minimum=1)
    declared = [_read_slot(s, "127.0.0.1") for s in t.tables("instances")]
    if not declared:
        t.error("instances", f"at least one [[{role}.instances]] is required")
    first_host = declared[0].host if declared else "127.0.0.1"
    pool = _read_pool(t.table("pool"), first_host, tp, dp) if t.has("pool") else []
    slots = tuple(declared + pool)

    count = t.integer("count", len(declared), minimum=1)
    config = RoleConfig(
        role=role,
        slots=slots,
        count=count,
        min=t.integer("min", min(count, 1), minimum=1),
        max=t.integer("max", len(slots), minimum=1),
        tp=tp,
        dp=dp,
        kv_role=t.text(
            "kv_role", "kv_producer" if role == "prefill" else "kv_consumer"
        ),
        args=t.str_list("args", None),
        env=t.env("env"),
        startup_timeout=t.seconds("startup_timeout", 1800.0),
    )
    if config.args is not None:
        _check_placeholders(t, "args", config.args)
    _check_role_counts(t, config)
    _check_slot_devices(t, config, len(declared))
    t.check_unknown()
    return config


def _check_role_counts(t: _Table, config: RoleConfig) -> None:
    if config.min > config.max:
        t.error("min", f"min ({config.min}) is greater than max ({config.max})")
    if not config.min <= config.count <= config.max:
        t.error("count", f"count {config.count} is outside min..max")
    if config.max > len(config.slots):
        t.error(
            "max",
            f"max is {config.max} but only {len(config.slots)} slots exist "
            "(declared instances plus pool); add ports/devices to the pool",
        )
    if config.count > len(config.slots):
        t.error("count", f"count {config.count} exceeds the {len(config.slots)} slots")


def _check_slot_devices(t: _Table, config: RoleConfig, declared: int) -> None:
    width = config.tp * config.dp
    for i, slot in enumerate(config.slots[:declared]):
        if slot.devices and len(slot.devices) != width:
            t.error(
                f"instances[{i}].devices",
                f"{len(slot.devices)} devices given but tensor_parallel_size x "
                f"data_parallel_size = {width}",
            )


def _read_proxy(top: _Table) -> ProxyConfig:
    t = top.table("proxy")
    kind = t.choice("kind", ("builtin", "external", "none"), "builtin")
    default_command: Any = ("{python}", "-m", "pdsupervisord.proxy")
    if kind == "external":
        default_command = _MISSING
    config = ProxyConfig(
        kind=kind,  # type: ignore[arg-type]
        host=t.text("host", "127.0.0.1"),
        port=t.port("port", 8080),
        command=t.str_list("command", default_command) or (),
        args=t.str_list("args", DEFAULT_PROXY_ARGS),
        env=t.env("env"),
        startup_timeout=t.seconds("startup_timeout", 60.0),
    )
    _check_placeholders(t, "command", config.command)
    _check_placeholders(t, "args", config.args)
    t.check_unknown()
    return config


def _read_probes(top: _Table) -> ProbeConfig:
    t = top.table("probes")
    d = ProbeConfig()
    config = ProbeConfig(
        timeout=t.seconds("timeout", d.timeout),
        startup_period=t.seconds("startup_period", d.startup_period),
        readiness_period=t.seconds("readiness_period", d.readiness_period),
        readiness_failures=t.integer("readiness_failures", d.readiness_failures, 1),
        readiness_successes=t.integer("readiness_successes", d.readiness_successes, 1),
        liveness_period=t.seconds("liveness_period", d.liveness_period),
        liveness_failures=t.integer("liveness_failures", d.liveness_failures, 1),
        canary_period=t.seconds("canary_period", d.canary_period),
        canary_timeout=t.seconds("canary_timeout", d.canary_timeout),
    )
    for key in ("startup_period", "readiness_period", "liveness_period", "timeout"):
        if getattr(config, key) == 0:
            t.error(key, "must be greater than 0")
    t.check_unknown()
    return config


def _read_logs(top: _Table) -> LogConfig:
    t = top.table("logs")
    d = LogConfig()
    config = LogConfig(
        max_bytes=t.integer("max_bytes", d.max_bytes, 1024),
        backups=t.integer("backups", d.backups, 0),
    )
    t.check_unknown()
    return config


def _read_checks(top: _Table) -> CheckConfig:
    t = top.table("checks")
    is_bool = (lambda v: isinstance(v, bool), "true or false")
    config = CheckConfig(
        ports=t.get("ports", *is_bool, True),
        devices=t.get("devices", *is_bool, True),
        device_command=t.str_list("device_command", ()),
    )
    if config.device_command and not any(
        "{device}" in token for token in config.device_command
    ):
        t.error("device_command", "must contain a {device} placeholder")
    t.check_unknown()
    return config


def _read_restart(top: _Table) -> RestartConfig:
    t = top.table("restart")
    config = RestartConfig(
        policy=t.choice("policy", ("always", "on-failure", "never"), "always"),  # type: ignore[arg-type]
        success_exit_codes=t.int_list("success_exit_codes", ()),
        backoff_initial=t.seconds("backoff_initial", 1.0),
        backoff_factor=t.seconds("backoff_factor", 2.0),
        backoff_max=t.seconds("backoff_max", 60.0),
        max_restarts=t.integer("max_restarts", 5),
        restart_window=t.seconds("restart_window", 300.0),
        stable_after=t.seconds("stable_after", 60.0),
    )
    if config.backoff_factor < 1:
        t.error("backoff_factor", "must be >= 1")
    t.check_unknown()
    return config


def _check_cross(top: _Table, topo: Topology) -> None:
    """Checks that span sections: duplicate ports and devices on one host."""
    owners: dict[tuple[str, str, int], str] = {}

    def claim(what: str, host: str, number: int, owner: str, section: str) -> None:
        key = (what, host, number)
        if key in owners:
            top.error(
                section,
                f"{what} {number} on {host} is used by both {owners[key]} and {owner}",
            )
        owners.setdefault(key, owner)

    for role in (topo.prefill, topo.decode):
        for i, slot in enumerate(role.slots):
            kind = "pool slot" if slot.from_pool else "instance"
            owner = f"{role.role}-{i} ({kind})"
            # RPC port ranges are checked by pdsupervisord.checks, with
            # connector-aware messages.
            claim("port", slot.host, slot.port, owner, role.role)
            for device in slot.devices:
                claim("device", slot.host, device, owner, role.role)
    if topo.proxy.kind != "none":
        claim("port", topo.proxy.host, topo.proxy.port, "proxy", "proxy")


def _check_device_ips(t: _Table, slot: InstanceSlot) -> None:
    """Device IPs and super device ids given for another node's NPUs."""
    for key in ("device_ips", "super_device_ids"):
        values = getattr(slot, key)
        if values and len(values) != len(slot.devices):
            t.error(key, f"{len(values)} given for {len(slot.devices)} devices")
    for address in slot.device_ips:
        if not _is_ipv4(address):
            t.error("device_ips", f"{address!r} is not an IPv4 address")


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _read_ascend(top: _Table, source: Path) -> AscendConfig:
    t = top.table("ascend")
    chip = t.choice("chip", ("A2", "A3"), "A2")
    flag = partial(t.get, check=lambda v: isinstance(v, bool), expected="a boolean")
    config = AscendConfig(
        chip=chip,  # type: ignore[arg-type]
        hccn_tool=_tool_path(source, t.text("hccn_tool", "hccn_tool")),
        npu_smi=_tool_path(source, t.text("npu_smi", "npu-smi")),
        hccn_conf=_resolve(source, t.text("hccn_conf", "/etc/hccn.conf")),
        generate_ranktable=flag("generate_ranktable", default=False),
        preflight=flag("preflight", default=False),
        npus_per_node=t.integer("npus_per_node", 16 if chip == "A3" else 8, 1),
        tool_timeout=t.seconds("tool_timeout", 10.0),
    )
    t.check_unknown()
    return config


def _tool_path(source: Path, value: str) -> str:
    """A bare program name is looked up on PATH; a path resolves like others."""
    return str(_resolve(source, value)) if "/" in value else value


def key_lines(text: str) -> Callable[[str], int | None]:
    """Return a lookup from a dotted key path of TOML ``text`` to its line.

    Checks that run after loading use it to point at the offending key; a
    key that is not written in the file resolves to its nearest ancestor.
    """
    return _Locator(text).line


def loads(text: str, source: Path | str = "<string>") -> Topology:
    """Parse and validate topology ``text``.

    Args:
        text: The TOML document.
        source: The file it came from; used in messages and to resolve
            relative paths.

    Raises:
        ConfigError: with every problem found (file, line, key, message).
    """
    source = Path(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        issue = ConfigIssue(
            str(source), int(line[1]) if line else None, "", f"invalid TOML: {exc}"
        )
        raise ConfigError([issue]) from exc

    ctx = _Context(str(source), _Locator(text))
    top = _Table(ctx, data, "")
    model = top.table("model", required=True)
    topo = Topology(
        source=source,
        daemon=_read_daemon(top, source),
        model_path=_non_empty(model, "path"),
        served_name=model.text("served_name", None),
        engine=_read_engine(top),
        env=top.env("env"),
        kv=_read_kv(top),
        prefill=_read_role(top, "prefill"),
        decode=_read_role(top, "decode"),
        proxy=_read_proxy(top),
        restart=_read_restart(top),
        probes=_read_probes(top),
        logs=_read_logs(top),
        checks=_read_checks(top),
        ascend=_read_ascend(top, source),
    )
    model.check_unknown()
    top.check_unknown()
    if not ctx.issues:
        _check_cross(top, topo)
    if ctx.issues:
        raise ConfigError(ctx.issues)
    return topo


def load(path: Path | str) -> Topology:
    """Read and validate the topology file at ``path``.

    Raises:
        ConfigError: when the file cannot be read or is invalid.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), None, "", str(exc))]) from exc
    return loads(text, path.resolve())
