"""Test helpers for the PD proxy: mock vLLM backends and a proxy subprocess.

Everything listens on 127.0.0.1 only, on ports the kernel picks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

LOCALHOST = "127.0.0.1"
TOKEN_ENV = "PDSUPERVISORD_PROXY_TOKEN"

# Modes a mock backend can be switched into.
OK = "ok"
STATUS_400 = "status_400"
STATUS_500 = "status_500"
HANG = "hang"
NO_KV = "no_kv"
DIE_BEFORE_FIRST = "die_before_first"
DIE_MIDSTREAM = "die_midstream"
NO_DONE = "no_done"


def free_port() -> int:
    """A port nothing listens on right now (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def dead_address() -> str:
    """A ``host:port`` that refuses connections."""
    return f"{LOCALHOST}:{free_port()}"


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll an async condition until true; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Seen:
    """One request a mock backend received."""

    path: str
    request_id: str | None
    body: dict[str, Any]


@dataclass
class MockBackend:
    """A stand-in for one vLLM instance, prefill or decode, with faults."""

    role: str
    mode: str = OK
    chunks: int = 3
    chunk_delay: float = 0.0
    hang_s: float = 20.0
    seen: list[Seen] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    cancelled: int = 0
    health_status: int = 200
    health_hang: bool = False
    probes: int = 0
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        """``host:port`` of this backend."""
        return f"{LOCALHOST}:{self.port}"

    async def start(self) -> MockBackend:
        """Listen on a free port of 127.0.0.1."""
        return await self.start_on(0)

    async def start_on(self, port: int) -> MockBackend:
        """Listen on the given port of 127.0.0.1 (0: a free one)."""
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOCALHOST, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Stop listening; later connections are refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def kv_params(self, request_id: str | None) -> dict[str, Any]:
        """The kv_transfer_params this prefiller answers with, extra keys too."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [3, 1, 4],
            "remote_engine_id": f"engine-{self.port}",
            "remote_host": LOCALHOST,
            "remote_port": self.port,
            "remote_tp_size": 1,
            "remote_request_id": request_id,
            "transfer_mode": "read",
            "x_future_key": {"nested": [1, None, "z"]},
        }

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request_id = request.headers.get("X-Request-Id")
        self.seen.append(Seen(request.path, request_id, body))
        self.arrived.set()

        if self.mode == HANG:
            await asyncio.sleep(self.hang_s)
        if self.mode == STATUS_400:
            error = {"object": "error", "message": "prompt too long", "code": 400}
            return web.json_response(error, status=400)
        if self.mode == STATUS_500:
            return web.json_response({"error": "engine core died"}, status=500)
        if self.mode == DIE_BEFORE_FIRST:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.role == "prefill":
            return self._prefill_answer(request_id)
        if body.get("stream"):
            return await self._stream(request, request_id)
        return web.json_response(self._completion(request_id))

    def _prefill_answer(self, request_id: str | None) -> web.Response:
        answer = self._completion(request_id)
        if self.mode != NO_KV:
            answer["kv_transfer_params"] = self.kv_params(request_id)
        return web.json_response(answer)

    def _completion(self, request_id: str | None) -> dict[str, Any]:
        return {
            "id": f"cmpl-{request_id}",
            "object": "chat.completion",
            "model": "mock",
            "choices": [{"index": 0, "message": {"content": f"from {self.port}"}}],
        }

    async def _stream(
        self, request: web.Request, request_id: str | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(self.chunks):
            delta = {"choices": [{"index": 0, "delta": {"content": f"t{index} "}}]}
            await self._send(response, {"id": f"cmpl-{request_id}", **delta})
            if self.mode == DIE_MIDSTREAM and index == 1:
                assert request.transport is not None
                request.transport.abort()
                return response
            await asyncio.sleep(self.chunk_delay)
        if self.mode != NO_DONE:
            await self._write(response, b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, event: dict[str, Any]) -> None:
        await self._write(response, f"data: {json.dumps(event)}\n\n".encode())

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        self.sent.append(data)
        await response.write(data)

    async def _health(self, request: web.Request) -> web.Response:
        self.probes += 1
        if self.health_hang:
            await asyncio.sleep(self.hang_s)
        return web.Response(status=self.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": "mock-model", "object": "model", "owned_by": "mock"}
        return web.json_response({"object": "list", "data": [model]})


class ProxyProcess:
    """``python -m pdsupervisord.proxy`` in its own process group."""

    def __init__(self, args: list[str], log_path: Path, token: str | None) -> None:
        self.args = args
        self.log_path = log_path
        self.token = token
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the running proxy."""
        return f"http://{LOCALHOST}:{self.port}"

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        """Start the proxy and wait for its ``proxy.listening`` log line.

        Raises:
            AssertionError: it exited or did not listen within the timeout.
        """
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        if self.token is not None:
            env[TOKEN_ENV] = self.token
        command = [sys.executable, "-m", "pdsupervisord.proxy", *self.args]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        self._await_listening(timeout)
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The proxy's JSON log lines so far, optionally one event only."""
        lines = self.log_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if name is None or e.get("event") == name]

    def stop(self) -> None:
        """SIGTERM the proxy's process group; SIGKILL it if it lingers."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def _await_listening(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listening = self.events("proxy.listening")
            if listening:
                self.port = listening[0]["port"]
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"proxy did not start:\n{self.log_path.read_text()}")


class Cluster:
    """Mock backends registered with a running proxy, plus client helpers."""

    def __init__(self, proxy: ProxyProcess, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.session = session
        self.backends: list[MockBackend] = []

    def url(self, path: str) -> str:
        """Absolute URL of a proxy path."""
        return self.proxy.url + path

    async def backend(
        self, role: str, *, register: bool = True, **options: Any
    ) -> MockBackend:
        """Start a mock backend and (by default) add it to the proxy."""
        mock = await MockBackend(role, **options).start()
        self.backends.append(mock)
        if register:
            await self.add(role, mock.address)
        return mock

    async def add(self, role: str, *addresses: str) -> dict[str, Any]:
        """Add backends through the membership API; asserts success."""
        body = {"type": role, "instances": list(addresses)}
        status, reply = await self.admin("POST", "/instances/add", body)
        assert status == 200, reply
        return reply

    async def admin(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = "default",
    ) -> tuple[int, dict[str, Any]]:
        """Call the membership API; ``token="default"`` uses the proxy's."""
        key = self.proxy.token if token == "default" else token
        headers = {} if key is None else {"X-API-Key": key}
        async with self.session.request(
            method, self.url(path), json=body, headers=headers
        ) as response:
            return response.status, await response.json()

    async def instances(self) -> list[dict[str, Any]]:
        """``GET /instances``'s list."""
        status, reply = await self.admin("GET", "/instances")
        assert status == 200, reply
        instances: list[dict[str, Any]] = reply["instances"]
        return instances

    async def assert_idle(self) -> None:
        """Wait until every backend's in-flight count and load are back to 0."""

        async def idle() -> bool:
            views = await self.instances()
            return all(v["in_flight"] == 0 and v["load"] == 0 for v in views)

        await wait_until(idle, what="in-flight counters back to 0")

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, CIMultiDict[str]]:
        """POST JSON to the proxy; returns status, raw body and headers."""
        async with self.session.post(
            self.url(path), json=body, headers=headers or {}
        ) as response:
            return response.status, await response.read(), CIMultiDict(response.headers)

    async def clear(self) -> None:
        """Remove every backend from the proxy and stop the mocks."""
        for view in await self.instances():
            body = {"type": view["type"], "instances": [view["address"]]}
            await self.admin("POST", "/instances/remove", body)
        for mock in self.backends:
            await mock.stop()

        async def empty() -> bool:
            return not await self.instances()

        # In-flight requests to stopped mocks fail fast; then the pool empties.
        await wait_until(empty, what="membership to empty")


def sse_data(raw: bytes) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    events = raw.decode().replace("\r\n", "\n").split("\n\n")
    return [
        line.removeprefix("data: ")
        for event in events
        for line in event.split("\n")
        if line.startswith("data: ")
    ]
