"""Starting, talking to and cleaning up stand-in engine processes in tests.

Every engine is started in a session of its own and tagged with an
environment variable unique to its launcher. Clean-up kills each started
process group and then every process still carrying the tag, which catches
engine children that left the group (``engine_setsid``) or were orphaned.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

TAG_VARIABLE = "PDSD_ENGINE_TEST_TAG"
MODEL = "/models/Qwen2.5-VL-7B-Instruct"

#: Default deadline of every wait, in seconds: generous, since two cores are
#: shared with other work, but bounded.
DEADLINE = 20.0


def free_port() -> int:
    """A port free on 127.0.0.1 right now (bound to 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive ports all free on 127.0.0.1 now."""
    for _ in range(100):
        base = free_port()
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no run of {count} free ports found")


def port_accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll ``condition`` every 20 ms until true.

    Raises:
        AssertionError: When ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as exited)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@dataclass
class Reply:
    """An HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass
class Stream:
    """A server-sent-event answer.

    Attributes:
        status: HTTP status.
        headers: Response headers.
        events: ``data:`` payloads in order, ``[DONE]`` included.
        complete: False when the connection broke before the body ended.
    """

    status: int
    headers: Mapping[str, str]
    events: list[str]
    complete: bool

    def chunks(self) -> list[dict[str, Any]]:
        """The JSON payloads, ``[DONE]`` left out."""
        return [json.loads(e) for e in self.events if e != "[DONE]"]


@dataclass
class Engine:
    """One started stand-in engine (its API server process)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """The API server's pid."""
        return self.process.pid

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEADLINE,
    ) -> Reply:
        """Send one HTTP request to the engine and read the whole answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=_encode(body), headers=dict(headers or {}))
            response = conn.getresponse()
            return Reply(response.status, dict(response.headers), response.read())
        finally:
            conn.close()

    def post(
        self, path: str, body: object, headers: Mapping[str, str] | None = None
    ) -> Reply:
        """POST ``body`` as JSON."""
        return self.request("POST", path, body, headers)

    def stream(
        self, path: str, body: object, headers: Mapping[str, str] | None = None
    ) -> Stream:
        """POST ``body`` and collect the server-sent events until the end."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        try:
            conn.request("POST", path, body=_encode(body), headers=dict(headers or {}))
            response = conn.getresponse()
            events, complete = _read_events(response)
            return Stream(response.status, dict(response.headers), events, complete)
        finally:
            conn.close()

    def health(self) -> int | None:
        """``GET /health`` status, None when the port refuses."""
        try:
            return self.request("GET", "/health", timeout=2.0).status
        except OSError:
            return None

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-us sample of ``/metrics``."""
        text = self.request("GET", "/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")

    def wait_healthy(self, timeout: float = DEADLINE) -> None:
        """Wait for ``/health`` 200.

        Raises:
            AssertionError: When the process exits or the deadline passes first.
        """

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"engine exited with {self.process.returncode}:\n{self.log()}"
                )
            return self.health() == 200

        wait_until(healthy, timeout)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        """Wait for the API server to exit; its exit status."""
        return self.process.wait(timeout)

    def log(self) -> str:
        """Everything the API server and engine child wrote so far."""
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Log lines as dicts, only those with event ``name`` when given."""
        lines = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if name is None or record.get("event") == name:
                    lines.append(record)
        return lines

    def wait_event(
        self, name: str, timeout: float = DEADLINE, **fields: Any
    ) -> dict[str, Any]:
        """Wait for a log line with event ``name`` and these field values."""
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            found[:] = [
                e
                for e in self.events(name)
                if all(e.get(k) == v for k, v in fields.items())
            ]
            return bool(found)

        wait_until(logged, timeout)
        return found[0]

    def engine_child(self) -> psutil.Process:
        """The engine child process (waits for it to be spawned)."""
        found: list[psutil.Process] = []

        def spawned() -> bool:
            found[:] = [
                child
                for child in psutil.Process(self.pid).children()
                if "pdsupervisord.engine.core" in " ".join(child.cmdline())
            ]
            return bool(found)

        wait_until(spawned)
        return found[0]


class Launcher:
    """Starts engines and kills everything they left behind.

    Args:
        workdir: Directory for logs and, unless overridden, device locks.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lock_dir = workdir / "locks"
        self._tag = uuid.uuid4().hex
        self._engines: list[Engine] = []

    def start(
        self,
        *flags: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        load_seconds: float = 0.2,
    ) -> Engine:
        """Start ``python -m pdsupervisord.engine serve MODEL --host 127.0.0.1``.

        Args:
            flags: Further ``vllm serve`` flags.
            env: Extra environment (devices, knobs, faults).
            port: API port; a free one when None.
            load_seconds: ``PDSD_ENGINE_LOAD_SECONDS``.
        """
        port = port or free_port()
        log_path = self.workdir / f"engine-{len(self._engines)}-{port}.log"
        argv = [
            sys.executable,
            "-m",
            "pdsupervisord.engine",
            "serve",
            MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *flags,
        ]
        full_env = {
            **os.environ,
            "PDSD_ENGINE_LOAD_SECONDS": str(load_seconds),
            "PDSD_ENGINE_LOCK_DIR": str(self.lock_dir),
            TAG_VARIABLE: self._tag,
            **(env or {}),
        }
        for name in ("ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
            if env is None or name not in env:
                full_env.pop(name, None)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        engine = Engine(process, port, log_path)
        self._engines.append(engine)
        return engine

    def cleanup(self) -> None:
        """Kill every process group started and every tagged process left."""
        for engine in self._engines:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.process.wait(DEADLINE)
        for process in self._tagged():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(list(self._tagged()), timeout=DEADLINE)

    def _tagged(self) -> Iterator[psutil.Process]:
        me = os.getuid()
        for process in psutil.process_iter(["uids"]):
            with contextlib.suppress(psutil.Error):
                if process.info["uids"].real != me:
                    continue
                if process.environ().get(TAG_VARIABLE) == self._tag:
                    yield process


def _encode(body: object) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


def _read_events(response: http.client.HTTPResponse) -> tuple[list[str], bool]:
    events: list[str] = []
    try:
        while line := response.readline():
            text = line.decode().strip()
            if text.startswith("data: "):
                events.append(text.removeprefix("data: "))
    except (http.client.IncompleteRead, ConnectionError):
        return events, False
    return events, bool(events) and events[-1] == "[DONE]"
