"""The three supervisors under test, started and driven the same way.

:class:`Ours` (pdsupervisord), :class:`Circus` (circusd) and
:class:`Supervisord` each run N copies of ``healthchild.py`` (or, for ours,
any topology file), pinned with ``taskset`` to one CPU, in a process group
created for them, with every file in a temporary directory and every socket
a unix socket in it (children listen on 127.0.0.1 only).

Clean-up is by pid only: every process seen in a supervisor's tree is
remembered with its start time, and whatever of it is still alive after the
supervisor's own shutdown is SIGKILLed by pid (start time checked, so a
recycled pid is never hit), then the process group created for the daemon.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from circus.client import CircusClient
from supervisor.xmlrpc import SupervisorTransport
from topologies import HEALTHCHILD, Layout

from pdsupervisord.client import Client

__all__ = ["Circus", "Ours", "Supervised", "Supervisord", "direct_children"]

BIN = Path(sys.executable).parent


def direct_children(pid: int) -> set[int]:
    """Pids of ``pid``'s direct children, read from /proc (cheap, no psutil)."""
    found: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found.update(int(p) for p in Path(path).read_text().split())
    return found


def port_open(port: int) -> bool:
    """Whether 127.0.0.1:port accepts a TCP connection."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every 50 ms; RuntimeError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _child_argv(port: int) -> list[str]:
    return [
        sys.executable,
        "-I",
        "-S",
        str(HEALTHCHILD),
        "/model/bench",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


class Supervised(ABC):
    """One supervisor daemon and its children.

    Args:
        label: Name in tables; the class's (``pdsupervisord``, ``circus``,
            ``supervisord``) unless given, e.g. for a variant configuration.
        workdir: A private directory for its files.
        cpu: The CPU it is pinned to (its children inherit it), or None.
    """

    label: str

    def __init__(
        self, workdir: Path, cpu: int | None, label: str | None = None
    ) -> None:
        if label is not None:
            self.label = label
        self.workdir = workdir
        self.cpu = cpu
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, float] = {}
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        assert self.process is not None
        return self.process.pid

    @abstractmethod
    def argv(self) -> list[str]:
        """The daemon's command line."""

    @abstractmethod
    def status(self) -> Any:
        """One control round trip (``status`` of every child); blocking."""

    @abstractmethod
    def ctl_argv(self) -> list[str]:
        """The whole-process ``... status`` command of this supervisor."""

    @abstractmethod
    def all_up(self) -> bool:
        """Whether every child is running (and, for ours, ready)."""

    def start(self) -> None:
        """Spawn the daemon pinned to ``cpu``, in a new session and group."""
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        log = (self.workdir / "daemon.log").open("ab")
        self.process = subprocess.Popen(
            pin + self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
        )
        log.close()

    def wait_up(self, timeout: float = 120.0) -> None:
        """Block until :meth:`all_up`; RuntimeError on timeout or daemon exit."""

        def check() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.process.returncode}; "
                    f"see {self.workdir / 'daemon.log'}"
                )
            try:
                return self.all_up()
            except Exception:
                return False

        wait_until(check, timeout, f"{self.label}'s children")
        self.remember_tree()

    def children(self) -> set[int]:
        """The daemon's direct children (the supervised processes)."""
        return direct_children(self.pid)

    def remember_tree(self) -> None:
        """Record every live descendant, for the clean-up by pid."""
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.seen[proc.pid] = proc.create_time()

    def graceful_stop(self) -> None:
        """Ask the daemon to stop its children and exit (SIGTERM by default)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the daemon and make sure nothing it started is left."""
        if self.process is None:
            return
        self.remember_tree()
        if self.process.poll() is None:
            self.graceful_stop()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        for pid, created in self.seen.items():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    print(f"{self.label}: killing leftover pid {pid}", file=sys.stderr)
                    proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class Ours(Supervised):
    """pdsupervisord on a topology file (written by the caller)."""

    label = "pdsupervisord"

    def __init__(
        self,
        workdir: Path,
        cpu: int | None,
        topology: Path,
        *,
        control: str,
        events: str,
        label: str | None = None,
    ) -> None:
        super().__init__(workdir, cpu, label)
        self.topology = topology
        self.control = control
        self.events = events
        self._client: Any = None

    @classmethod
    def on(
        cls, layout: Layout, cpu: int | None, topology: Path, label: str | None = None
    ) -> Ours:
        """The daemon for a topology file written with ``layout``."""
        return cls(
            layout.workdir,
            cpu,
            topology,
            control=layout.control,
            events=layout.events,
            label=label,
        )

    def argv(self) -> list[str]:
        """``pdsupervisord -c TOPOLOGY --log-format json``."""
        return [
            str(BIN / "pdsupervisord"),
            "-c",
            str(self.topology),
            "--log-format",
            "json",
        ]

    @property
    def client(self) -> Any:
        """A :class:`pdsupervisord.client.Client`, made on first use."""
        if self._client is None:
            self._client = Client(self.control, timeout=30)
        return self._client

    def status(self) -> Any:
        """``status`` through the project's Python client."""
        return self.client.call("status")

    def ctl_argv(self) -> list[str]:
        """``pdsupervisorctl -c TOPOLOGY status``."""
        return [str(BIN / "pdsupervisorctl"), "-c", str(self.topology), "status"]

    def ctl_socket_argv(self) -> list[str]:
        """``pdsupervisorctl -s ENDPOINT status`` (no topology file to parse)."""
        return [str(BIN / "pdsupervisorctl"), "-s", self.control, "status"]

    def all_up(self) -> bool:
        """Every instance ``ready``."""
        instances = self.status()["instances"]
        return bool(instances) and all(i["state"] == "ready" for i in instances)

    def graceful_stop(self) -> None:
        """The ``shutdown`` command (falls back to SIGTERM)."""
        try:
            self.client.call("shutdown", reply_timeout=5)
        except Exception:
            super().graceful_stop()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the daemon; close the client socket."""
        super().stop(timeout)
        if self._client is not None:
            self._client.close()
            self._client = None


class Circus(Supervised):
    """circusd with one watcher per healthchild, defaults otherwise."""

    label = "circus"

    def __init__(self, workdir: Path, cpu: int | None, ports: list[int]) -> None:
        super().__init__(workdir, cpu)
        self.ports = ports
        self.endpoint = f"ipc://{workdir}/circus.sock"
        self.config = workdir / "circus.ini"
        self.config.write_text(self._ini())
        self._client: Any = None

    def _ini(self) -> str:
        lines = [
            "[circus]",
            f"endpoint = {self.endpoint}",
            f"pubsub_endpoint = ipc://{self.workdir}/circus-pub.sock",
            "",
        ]
        for i, port in enumerate(self.ports):
            argv = _child_argv(port)
            lines += [
                f"[watcher:c{i:02d}]",
                f"cmd = {argv[0]}",
                f"args = {' '.join(argv[1:])}",
                "numprocesses = 1",
                "",
            ]
        return "\n".join(lines)

    def argv(self) -> list[str]:
        """``circusd --log-output FILE circus.ini``."""
        return [
            str(BIN / "circusd"),
            "--log-output",
            str(self.workdir / "circusd.log"),
            str(self.config),
        ]

    @property
    def client(self) -> Any:
        """circus's own ``CircusClient``."""
        if self._client is None:
            self._client = CircusClient(endpoint=self.endpoint, timeout=30)
        return self._client

    def status(self) -> Any:
        """circus's ZMQ ``status`` of every watcher."""
        return self.client.call({"command": "status", "properties": {}})

    def ctl_argv(self) -> list[str]:
        """``circusctl --endpoint ENDPOINT status``."""
        return [str(BIN / "circusctl"), "--endpoint", self.endpoint, "status"]

    def all_up(self) -> bool:
        """One child per watcher, every port answering."""
        return len(self.children()) == len(self.ports) and all(
            port_open(p) for p in self.ports
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop circusd; close the client socket."""
        super().stop(timeout)
        if self._client is not None:
            self._client.stop()
            self._client = None


class Supervisord(Supervised):
    """supervisord with one program per healthchild, defaults otherwise."""

    label = "supervisord"

    def __init__(self, workdir: Path, cpu: int | None, ports: list[int]) -> None:
        super().__init__(workdir, cpu)
        self.ports = ports
        self.socket = workdir / "supervisor.sock"
        self.config = workdir / "supervisord.conf"
        (workdir / "childlogs").mkdir(exist_ok=True)
        self.config.write_text(self._conf())
        self._rpc: Any = None

    def _conf(self) -> str:
        w = self.workdir
        lines = [
            "[unix_http_server]",
            f"file = {self.socket}",
            "",
            "[supervisord]",
            f"logfile = {w / 'supervisord.log'}",
            f"pidfile = {w / 'supervisord.pid'}",
            f"childlogdir = {w / 'childlogs'}",
            "nodaemon = true",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = "
            "supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl = unix://{self.socket}",
            "",
        ]
        for i, port in enumerate(self.ports):
            lines += [
                f"[program:c{i:02d}]",
                f"command = {' '.join(_child_argv(port))}",
                "autorestart = true",
                "",
            ]
        return "\n".join(lines)

    def argv(self) -> list[str]:
        """``supervisord -n -c supervisord.conf``."""
        return [str(BIN / "supervisord"), "-n", "-c", str(self.config)]

    @property
    def rpc(self) -> Any:
        """An XML-RPC proxy over the unix socket, as supervisorctl makes it."""
        if self._rpc is None:
            transport = SupervisorTransport(None, None, f"unix://{self.socket}")
            self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport)
        return self._rpc

    def status(self) -> Any:
        """XML-RPC ``supervisor.getAllProcessInfo``."""
        return self.rpc.supervisor.getAllProcessInfo()

    def ctl_argv(self) -> list[str]:
        """``supervisorctl -c supervisord.conf status``."""
        return [str(BIN / "supervisorctl"), "-c", str(self.config), "status"]

    def all_up(self) -> bool:
        """Every program ``RUNNING`` (past ``startsecs``)."""
        infos = self.status()
        return len(infos) == len(self.ports) and all(
            i["statename"] == "RUNNING" for i in infos
        )

    def state_of(self, index: int) -> str:
        """The state name of program ``c<index>``."""
        return str(self.rpc.supervisor.getProcessInfo(f"c{index:02d}")["statename"])
