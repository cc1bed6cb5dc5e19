"""Fixtures that run real daemons on real topologies of stand-in engines.

Every port is picked free, every file lives under tmp_path, all traffic goes
to 127.0.0.1, and teardown kills every process group the test started, then
fails the test if any had to be killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from pdsupervisord.client import Client


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together while picking)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until truthy; fail the test after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != "zombie":
                found.append(proc.pid)
    return found


TOPOLOGY = """
[daemon]
run_dir = "{tmp}/run"
log_dir = "{tmp}/log"
stop_timeout = 5

[probes]
startup_period = 0.05
readiness_period = 0.5
liveness_period = 0.5

[model]
path = "/model/Qwen2.5-VL-7B-Instruct"
served_name = "qwen25vl"

[engine]
command = ["{{python}}", "-m", "pdsupervisord.engine", "serve"]
host = "127.0.0.1"
args = ["--tensor-parallel-size", "{{tp}}", "--served-model-name", "{{served_name}}",
        "--max-model-len", "4096", "--seed", "1024"]

[engine.env]
PDSD_ENGINE_LOAD_SECONDS = "{load}"
PDSD_ENGINE_LOCK_DIR = "{tmp}/locks"
PDSD_ENGINE_TOKEN_SECONDS = "{token}"

[env]
HCCL_IF_IP = "127.0.0.1"

[kv]
kv_connector = "LLMDataDistCMgrConnector"
kv_buffer_device = "npu"
kv_parallel_size = 1
engine_id = "0"

[prefill]
startup_timeout = 30
min = 1
max = 3

[[prefill.instances]]
port = {p0}
devices = [0]
rpc_port = {r0}

[prefill.pool]
ports = [{p1}, {p2}]
devices = [2, 3]
rpc_ports = [{r1}, {r2}]

[decode]
startup_timeout = 30

[[decode.instances]]
port = {d0}
devices = [1]
rpc_port = {rd}

[proxy]
kind = "builtin"
host = "127.0.0.1"
port = {proxy}

[restart]
backoff_initial = 0.1
backoff_max = 1
max_restarts = 10
restart_window = 60
{extra}
"""


@dataclass
class Topo:
    """A written topology file and what tests need to reach it."""

    path: Path
    tmp: Path
    ports: dict[str, int]
    endpoint: str

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.endpoint, timeout=timeout)

    def call(self, command: str, **args: Any) -> Any:
        with self.client(timeout=args.pop("reply_timeout", 30.0)) as client:
            return client.call(command, **args)

    def status(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        instances = self.call("status", reply_timeout=timeout)["instances"]
        return {e["name"]: e for e in instances}

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pdsupervisord.ctl", "-c", str(self.path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log(self, name: str) -> str:
        path = self.tmp / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"


def write_topology(
    tmp: Path,
    load: float = 0.3,
    token: float = 0.0,
    extra: str = "",
    replace: dict[str, str] | None = None,
) -> Topo:
    """Write a 1P1D stand-in topology with a pool of two more P.

    ``extra`` is appended (new tables); ``replace`` maps text of the template
    to its replacement (to change a key already there).
    """
    names = ["p0", "p1", "p2", "d0", "proxy", "r0", "r1", "r2", "rd"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    text = TOPOLOGY.format(tmp=tmp, load=load, token=token, extra=extra, **ports)
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / "topology.toml"
    path.write_text(text)
    return Topo(path, tmp, ports, f"ipc://{tmp}/run/control.sock")


@dataclass
class Daemon:
    """A running ``pdsupervisord`` process and the groups it started."""

    topo: Topo
    process: subprocess.Popen[bytes]
    groups: set[int] = field(default_factory=set)

    def remember_groups(self) -> None:
        """Record every child's process group for the leak check at teardown."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            for entry in self.topo.status(timeout=3.0).values():
                if entry["pid"]:
                    self.groups.add(entry["pid"])

    def wait_ready(
        self,
        names: tuple[str, ...] = ("prefill-0", "decode-0", "proxy"),
        timeout: float = 30,
    ) -> dict[str, dict[str, Any]]:
        def ready() -> dict[str, dict[str, Any]] | None:
            try:
                status = self.topo.status()
            except Exception:
                return None
            if all(status.get(n, {}).get("state") == "ready" for n in names):
                return status
            return None

        status = wait_until(ready, timeout, f"{names} ready")
        self.remember_groups()
        return status  # type: ignore[no-any-return]

    def terminate(self, timeout: float = 30) -> int:
        self.remember_groups()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_daemon(topo: Topo) -> Daemon:
    """Start the daemon on ``topo`` in its own session, logging to a file."""
    log = open(topo.tmp / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdsupervisord.daemon",
            "-c",
            str(topo.path),
            "--log-format",
            "json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return Daemon(topo, process)


def _cleanup(daemon: Daemon) -> list[int]:
    """Stop the daemon; kill and return any process it left behind."""
    with contextlib.suppress(Exception):
        daemon.terminate(timeout=40)
    if daemon.process.poll() is None:
        os.killpg(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait(timeout=10)
    leaked = []
    for pgid in daemon.groups:
        members = group_members(pgid)
        leaked += members
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return leaked


@contextlib.contextmanager
def running(topo: Topo) -> Iterator[Daemon]:
    """Run a daemon on ``topo``; on exit stop it and fail if it leaked processes."""
    daemon = start_daemon(topo)
    try:
        yield daemon
    finally:
        leaked = _cleanup(daemon)
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture
def topo(tmp_path: Path) -> Topo:
    return write_topology(tmp_path)


@pytest.fixture
def daemon(topo: Topo) -> Iterator[Daemon]:
    """A daemon running ``topo``; teardown fails if it leaves a process behind."""
    running = start_daemon(topo)
    try:
        yield running
    finally:
        leaked = _cleanup(running)
    assert not leaked, f"processes left behind: {leaked}"


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    """One HTTP request to 127.0.0.1; returns (status, body) even for errors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
