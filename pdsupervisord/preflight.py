"""Pre-start checks: are the instance's ports and devices really free?

vLLM binds with SO_REUSEPORT on some versions, so a leftover engine on the
same port would silently share it; and an orphaned EngineCore keeps its
device. These checks run before every start and name the holder (pid and
command line) so the operator knows what to kill.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from pdsupervisord.config import CheckConfig
from pdsupervisord.engine.devices import lock_path
from pdsupervisord.engine.knobs import lock_dir
from pdsupervisord.plan import InstanceSpec

__all__ = ["Problem", "check_instance"]


@dataclass(frozen=True)
class Problem:
    """One failed check: what (``port_in_use``/``device_busy``) and why."""

    kind: str
    message: str


def check_instance(spec: InstanceSpec, config: CheckConfig) -> list[Problem]:
    """Run every enabled check for ``spec``; blocking (call in a thread)."""
    problems: list[Problem] = []
    if config.ports:
        problems += _check_ports(_ports_of(spec))
    if config.devices and spec.devices:
        locks = lock_dir({**os.environ, **spec.env})
        problems += _check_device_locks(spec.devices, locks)
        if config.device_command:
            problems += _check_device_command(spec.devices, config.device_command)
    return problems


def _ports_of(spec: InstanceSpec) -> list[int]:
    return [p for p in (spec.port, *spec.rpc_ports) if p]


#: Seconds to wait for a busy port that no process holds. Right after a
#: SIGKILL the kernel may keep the dead engine's connections (FIN_WAIT) for a
#: moment, and they block a bind even with SO_REUSEADDR; measured on real
#: vLLM as well under a second. A port held by a live process fails at once.
ORPHANED_SOCKET_GRACE = 3.0


def _check_ports(ports: Iterable[int]) -> list[Problem]:
    busy = [port for port in ports if not _bindable(port)]
    if not busy:
        return []
    holders = _listeners(set(busy))
    deadline = time.monotonic() + ORPHANED_SOCKET_GRACE
    while busy and not holders and time.monotonic() < deadline:
        time.sleep(0.05)
        busy = [port for port in busy if not _bindable(port)]
        holders = _listeners(set(busy)) if busy else {}
    return [
        Problem("port_in_use", f"port {port} is in use{_describe(holders.get(port))}")
        for port in busy
    ]


def _bindable(port: int) -> bool:
    """Whether a plain (non-SO_REUSEPORT) bind on all interfaces succeeds.

    SO_REUSEADDR lets the bind pass over TIME_WAIT leftovers of a previous
    run, but not over any socket still bound or listening.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _listeners(ports: set[int]) -> dict[int, psutil.Process]:
    """Map each port to one process that has a socket bound on it."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port in ports and conn.pid:
                with contextlib.suppress(psutil.Error):
                    found.setdefault(conn.laddr.port, psutil.Process(conn.pid))
    return found


def _describe(process: psutil.Process | None) -> str:
    if process is None:
        return " (holder not visible)"
    with contextlib.suppress(psutil.Error):
        cmdline = " ".join(process.cmdline()) or process.name()
        return f" by pid {process.pid} ({cmdline[:200]})"
    return f" by pid {process.pid}"


def _check_device_locks(devices: Iterable[int], directory: Path) -> list[Problem]:
    """Devices whose stand-in lock file is held by a live process."""
    problems = []
    for device in devices:
        path = lock_path(directory, str(device))
        if not path.exists():
            continue
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _process(handle.read().strip())
                message = f"device {device} is held{_describe(holder)}"
                problems.append(Problem("device_busy", message))
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return problems


def _process(text: str) -> psutil.Process | None:
    with contextlib.suppress(ValueError, psutil.Error):
        return psutil.Process(int(text.split(maxsplit=1)[0]))
    return None


def _check_device_command(
    devices: Iterable[int], command: tuple[str, ...]
) -> list[Problem]:
    problems = []
    for device in devices:
        argv = [token.replace("{device}", str(device)) for token in command]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(Problem("device_check_failed", f"{argv[0]}: {exc}"))
            continue
        if done.returncode != 0:
            detail = (done.stdout + done.stderr).strip().replace("\n", "; ")[:300]
            problems.append(
                Problem("device_busy", f"device {device} is held: {detail}")
            )
    return problems


def describe_pid(pid: int) -> str:
    """``pid 123 (cmdline)`` for messages, or just the pid if it is gone."""
    with contextlib.suppress(psutil.Error):
        return f"pid {pid} ({' '.join(psutil.Process(pid).cmdline())[:200]})"
    return f"pid {pid}"
