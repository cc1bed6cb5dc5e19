"""Topology files for pdsupervisord in the benchmarks.

Two shapes: ``tiny`` runs N copies of ``healthchild.py`` as engines (half
prefill, half decode, no proxy), the same program circus and supervisord
supervise; ``standin`` runs the stand-in vLLM engine with a fixed load time,
one decode, prefill slots for scaling, and the built-in proxy.

The settings that decide the figures are spelled out here rather than left to
defaults, so each RESULTS.md section can quote them.
"""

from __future__ import annotations

import json
import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "HEALTHCHILD",
    "PROBES_OFF",
    "Probes",
    "Restart",
    "free_ports",
    "standin_topology",
    "tiny_topology",
]

HEALTHCHILD = Path(__file__).resolve().parent / "healthchild.py"


@dataclass(frozen=True)
class Probes:
    """``[probes]``: the daemon's defaults unless a bench says otherwise."""

    startup_period: float = 0.5
    readiness_period: float = 5.0
    liveness_period: float = 10.0
    timeout: float = 2.0

    def toml(self) -> str:
        """The ``[probes]`` table."""
        return (
            "[probes]\n"
            f"startup_period = {self.startup_period}\n"
            f"readiness_period = {self.readiness_period}\n"
            f"liveness_period = {self.liveness_period}\n"
            f"timeout = {self.timeout}\n"
        )

    def describe(self) -> str:
        """One line for RESULTS.md."""
        return (
            f"`[probes] startup_period = {self.startup_period}`, "
            f"`readiness_period = {self.readiness_period}`, "
            f"`liveness_period = {self.liveness_period}`"
        )


#: Readiness and liveness probes pushed out to once an hour: the daemon
#: without its periodic probe load, to tell the probes' cost from the rest.
PROBES_OFF = Probes(readiness_period=3600.0, liveness_period=3600.0)


@dataclass(frozen=True)
class Restart:
    """``[restart]``.

    ``stable_after = 0`` makes every crash of an instance that had become
    ready start a fresh failure streak, which is what circus and supervisord
    do for a process that was running (no growing delay); ``max_restarts`` is
    raised so that repeated trials never reach ``fatal``.
    """

    backoff_initial: float = 1.0
    stable_after: float = 60.0
    max_restarts: int = 5

    def toml(self) -> str:
        """The ``[restart]`` table."""
        return (
            "[restart]\n"
            'policy = "always"\n'
            f"backoff_initial = {self.backoff_initial}\n"
            f"stable_after = {self.stable_after}\n"
            f"max_restarts = {self.max_restarts}\n"
            "restart_window = 300\n"
        )

    def describe(self) -> str:
        """One line for RESULTS.md."""
        return (
            f"`[restart] backoff_initial = {self.backoff_initial}`, "
            f"`stable_after = {self.stable_after}`, "
            f"`max_restarts = {self.max_restarts}`"
        )


@dataclass(frozen=True)
class Layout:
    """Where one daemon keeps its files."""

    workdir: Path
    stop_timeout: float = 10.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        """Sockets and the state file."""
        return self.workdir / "run"

    @property
    def log_dir(self) -> Path:
        """Child logs."""
        return self.workdir / "log"

    @property
    def control(self) -> str:
        """The control endpoint."""
        return f"ipc://{self.run_dir}/control.sock"

    @property
    def events(self) -> str:
        """The event endpoint."""
        return f"ipc://{self.run_dir}/events.sock"

    def daemon_toml(self) -> str:
        """The ``[daemon]`` table."""
        return (
            "[daemon]\n"
            f'run_dir = "{self.run_dir}"\n'
            f'log_dir = "{self.log_dir}"\n'
            f"stop_timeout = {self.stop_timeout}\n"
        )


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that are free right now.

    All are held open together while choosing, so none repeats; another
    program may still take one before the bench binds it (unlikely).
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return ports


def _toml_list(values: list[str]) -> str:
    return json.dumps(values)


def _instances(role: str, ports: list[int], devices: list[list[int]]) -> str:
    blocks = []
    for port, devs in zip(ports, devices, strict=True):
        blocks.append(
            f"[[{role}.instances]]\n"
            f'host = "127.0.0.1"\nport = {port}\ndevices = {devs}\n'
        )
    return "\n".join(blocks)


def tiny_topology(
    layout: Layout, ports: list[int], probes: Probes, restart: Restart
) -> str:
    """N healthchild instances (one per port), half prefill, half decode.

    No devices (so no device-lock checks; the port check still runs before
    every start) and no proxy, so the daemon has exactly N children.
    """
    half = (len(ports) + 1) // 2
    prefill, decode = ports[:half], ports[half:]
    command = [sys.executable, "-I", "-S", str(HEALTHCHILD)]
    return "\n".join(
        [
            layout.daemon_toml(),
            '[model]\npath = "/model/bench"\n',
            f'[engine]\ncommand = {_toml_list(command)}\nhost = "127.0.0.1"\n',
            "[prefill]\nstartup_timeout = 60\n",
            _instances("prefill", prefill, [[] for _ in prefill]),
            "[decode]\nstartup_timeout = 60\n",
            _instances("decode", decode, [[] for _ in decode]),
            '[proxy]\nkind = "none"\n',
            probes.toml(),
            restart.toml(),
        ]
    )


def standin_topology(
    layout: Layout,
    *,
    load_seconds: float,
    prefill_slots: int,
    probes: Probes,
    restart: Restart,
    proxy: bool = True,
) -> tuple[str, dict[str, int]]:
    """1 prefill (plus ``prefill_slots - 1`` pool slots) and 1 decode stand-in.

    Returns:
        The TOML text and the ports by name (``prefill-0``, ``prefill-1``...,
        ``decode-0``, ``proxy``).
    """
    ports = free_ports(2 * prefill_slots + 3)
    http, rpc = ports[: prefill_slots + 2], ports[prefill_slots + 2 :]
    names = [f"prefill-{i}" for i in range(prefill_slots)] + ["decode-0", "proxy"]
    by_name = dict(zip(names, http, strict=True))
    env = {
        "PDSD_ENGINE_LOAD_SECONDS": str(load_seconds),
        "PDSD_ENGINE_LOCK_DIR": str(layout.workdir / "locks"),
        **layout.extra_env,
    }
    env_toml = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    pool = ""
    if prefill_slots > 1:
        pool = (
            "[prefill.pool]\n"
            f"ports = {http[1:prefill_slots]}\n"
            f"devices = {list(range(2, prefill_slots + 1))}\n"
            f"rpc_ports = {rpc[1:prefill_slots]}\n"
        )
    text = "\n".join(
        [
            layout.daemon_toml(),
            '[model]\npath = "/model/bench"\nserved_name = "bench"\n',
            "[engine]\n"
            'command = ["{python}", "-m", "pdsupervisord.engine", "serve"]\n'
            'host = "127.0.0.1"\n'
            'args = ["--served-model-name", "{served_name}"]\n'
            f"env = {{ {env_toml} }}\n",
            '[env]\nHCCL_IF_IP = "127.0.0.1"\n',
            "[kv]\n"
            'kv_connector = "LLMDataDistCMgrConnector"\n'
            'kv_buffer_device = "npu"\n'
            "kv_parallel_size = 1\n"
            'kv_port = "20001"\n'
            'engine_id = "0"\n'
            "kv_connector_module_path = "
            '"vllm_ascend.distributed.llmdatadist_c_mgr_connector"\n',
            f"[prefill]\nstartup_timeout = 60\nmin = 1\nmax = {prefill_slots}\n",
            "[[prefill.instances]]\n"
            f'host = "127.0.0.1"\nport = {http[0]}\ndevices = [0]\n'
            f"rpc_port = {rpc[0]}\n",
            pool,
            "[decode]\nstartup_timeout = 60\n",
            "[[decode.instances]]\n"
            f'host = "127.0.0.1"\nport = {by_name["decode-0"]}\ndevices = [1]\n'
            f"rpc_port = {rpc[prefill_slots]}\n",
            f'[proxy]\nkind = "{"builtin" if proxy else "none"}"\n'
            f'host = "127.0.0.1"\nport = {by_name["proxy"]}\n',
            probes.toml(),
            restart.toml(),
        ]
    )
    return text, by_name
