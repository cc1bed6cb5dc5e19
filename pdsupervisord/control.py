"""The ZeroMQ control server: decode, validate, dispatch, encode.

No business logic lives here; each command is a thin adapter from a request's
arguments to a :class:`~pdsupervisord.supervisor.Supervisor` method. Every
request runs in its own task, so a slow ``scale --wait`` never delays
``status``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.abc
import structlog
import zmq
import zmq.asyncio

from pdsupervisord import __version__, protocol
from pdsupervisord.errors import ConfigError, PlanError, ScaleError
from pdsupervisord.events import Event, encode
from pdsupervisord.logfiles import tail
from pdsupervisord.protocol import ErrorCode, ProtocolError, Request
from pdsupervisord.supervisor import Supervisor, UnknownInstanceError

__all__ = ["ControlServer", "EndpointRefusedError", "check_endpoint"]

log = structlog.get_logger("pdsupervisord.control")

Handler = Callable[["ControlServer", Request], Awaitable[Any]]
_COMMANDS: dict[str, Handler] = {}


class EndpointRefusedError(ValueError):
    """Raised at start-up for an endpoint the daemon will not listen on."""


def check_endpoint(endpoint: str) -> None:
    """Refuse endpoints that would expose the control plane.

    Only ``ipc://`` and ``tcp://127.0.0.1`` are accepted: there is no
    authentication on the socket, so anything reachable from other hosts
    would hand them the daemon.

    Raises:
        EndpointRefusedError: for any other endpoint.
    """
    if endpoint.startswith("ipc://"):
        return
    if endpoint.startswith(("tcp://127.0.0.1:", "tcp://localhost:")):
        return
    raise EndpointRefusedError(
        f"refusing control endpoint {endpoint!r}: only ipc:// and "
        "tcp://127.0.0.1:PORT are allowed (the socket has no authentication)"
    )


@contextmanager
def _private_umask() -> Iterator[None]:
    """Create ipc socket files with mode 0600 (no window with looser bits)."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def command(name: str) -> Callable[[Handler], Handler]:
    """Register a command handler under ``name``."""

    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = handler
        return handler

    return register


class ControlServer:
    """ROUTER socket for requests, PUB socket for events."""

    def __init__(
        self,
        supervisor: Supervisor,
        endpoint: str,
        events_endpoint: str,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.supervisor = supervisor
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint
        self._on_shutdown = on_shutdown
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.PUB)
        self._send_lock = anyio.Lock()
        self.started_at = time.time()

    def bind(self) -> None:
        """Bind both sockets (ipc files 0600).

        Raises:
            EndpointRefusedError: for a non-local endpoint.
            zmq.ZMQError: when the address is in use or invalid.
        """
        for endpoint in (self.endpoint, self.events_endpoint):
            check_endpoint(endpoint)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        with _private_umask():
            _remove_stale_ipc(self.endpoint)
            _remove_stale_ipc(self.events_endpoint)
            self._router.bind(self.endpoint)
            self._pub.bind(self.events_endpoint)

    def publish(self, event: Event) -> None:
        """Event sink: publish without blocking (PUB drops for slow readers)."""
        try:
            self._pub.send_multipart(encode(event), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("control.event_dropped", seq=event.seq)

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        async with anyio.create_task_group() as tg:
            while True:
                frames = await self._router.recv_multipart()
                if len(frames) < 2 or len(frames) > 4:
                    continue  # not a request we can route a reply to: drop it
                tg.start_soon(self._answer, frames)

    def close(self) -> None:
        """Close sockets and remove ipc files."""
        self._router.close(0)
        self._pub.close(0)
        self._ctx.term()
        _remove_stale_ipc(self.endpoint)
        _remove_stale_ipc(self.events_endpoint)

    async def _answer(self, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        reply = await self.dispatch(payload)
        async with self._send_lock:
            await self._router.send_multipart([*envelope, reply])

    async def dispatch(self, payload: bytes) -> bytes:
        """Decode, run and encode one request; never raises."""
        try:
            request = protocol.decode_request(payload)
        except ProtocolError as exc:
            return protocol.error_reply(exc.request_id, exc.code, str(exc))
        handler = _COMMANDS.get(request.command)
        if handler is None:
            known = ", ".join(sorted(_COMMANDS))
            message = f"unknown command {request.command!r} (known: {known})"
            return protocol.error_reply(request.id, ErrorCode.UNKNOWN_COMMAND, message)
        try:
            result = await handler(self, request)
        except ProtocolError as exc:
            return protocol.error_reply(request.id, exc.code, str(exc))
        except UnknownInstanceError as exc:
            names = ", ".join(self.supervisor.instances)
            message = f"no instance named {exc.args[0]!r} (have: {names})"
            return protocol.error_reply(request.id, ErrorCode.UNKNOWN_INSTANCE, message)
        except ScaleError as exc:
            return protocol.error_reply(request.id, ErrorCode.SCALE, str(exc))
        except (ConfigError, PlanError) as exc:
            return protocol.error_reply(request.id, ErrorCode.INVALID_CONFIG, str(exc))
        except FileNotFoundError as exc:
            return protocol.error_reply(request.id, ErrorCode.NOT_FOUND, str(exc))
        except Exception as exc:  # a bug must cost one reply, not the daemon
            log.exception("control.handler_failed", command=request.command)
            return protocol.error_reply(request.id, ErrorCode.INTERNAL, repr(exc))
        return protocol.ok_reply(request.id, result)


def _remove_stale_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)


# ------------------------------------------------------------------ arguments


def _arg(request: Request, key: str, kind: type, default: Any = ...) -> Any:
    """Fetch and type-check one argument.

    Raises:
        ProtocolError: with ``bad_args`` when missing or of the wrong type.
    """
    if key not in request.args:
        if default is ...:
            raise ProtocolError(ErrorCode.BAD_ARGS, f"missing argument {key!r}")
        return default
    value = request.args[key]
    ok = isinstance(value, kind) and not (
        kind in (int, float) and isinstance(value, bool)
    )
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ProtocolError(
            ErrorCode.BAD_ARGS, f"argument {key!r} must be {kind.__name__}"
        )
    return value


def _wait(request: Request) -> float:
    """The optional ``wait`` argument: seconds to wait for the outcome."""
    value = _arg(request, "wait", float, 0.0)
    if value < 0 or value > 3600:
        raise ProtocolError(ErrorCode.BAD_ARGS, "'wait' must be within 0..3600 s")
    return float(value)


# ------------------------------------------------------------------- commands


@command("status")
async def _status(server: ControlServer, request: Request) -> Any:
    name = _arg(request, "name", str, None)
    entries = server.supervisor.status()
    if name is not None:
        entries = [e for e in entries if name in (e["name"], e["role"])]
        if not entries:
            raise UnknownInstanceError(name)
    return {
        "instances": entries,
        "daemon": {
            "pid": os.getpid(),
            "version": __version__,
            "config": str(server.supervisor.topo.source),
            "uptime": time.time() - server.started_at,
            "summary": server.supervisor.summary(),
            "broken_pairs": [
                {"prefill": p, "decode": d, "error": error}
                for (p, d), error in server.supervisor.broken_pairs.items()
            ],
        },
    }


@command("start")
async def _start(server: ControlServer, request: Request) -> Any:
    return await server.supervisor.start(_arg(request, "name", str), _wait(request))


@command("stop")
async def _stop(server: ControlServer, request: Request) -> Any:
    return await server.supervisor.stop(_arg(request, "name", str), _wait(request))


@command("restart")
async def _restart(server: ControlServer, request: Request) -> Any:
    return await server.supervisor.restart(_arg(request, "name", str), _wait(request))


@command("scale")
async def _scale(server: ControlServer, request: Request) -> Any:
    role = _arg(request, "role", str)
    if role not in ("prefill", "decode"):
        raise ProtocolError(ErrorCode.BAD_ARGS, "'role' must be prefill or decode")
    count = _arg(request, "count", int)
    return await server.supervisor.scale(role, count, _wait(request))


@command("reset")
async def _reset(server: ControlServer, request: Request) -> Any:
    return await server.supervisor.reset(_arg(request, "name", str), _wait(request))


@command("reload")
async def _reload(server: ControlServer, request: Request) -> Any:
    return await server.supervisor.reload_file(_wait(request))


@command("tail")
async def _tail(server: ControlServer, request: Request) -> Any:
    instance = server.supervisor.get(_arg(request, "name", str))
    lines = _arg(request, "lines", int, 50)
    if not 0 <= lines <= 10_000:
        raise ProtocolError(ErrorCode.BAD_ARGS, "'lines' must be within 0..10000")
    path = instance.log_file.path
    found = await anyio.to_thread.run_sync(tail, path, lines)
    return {"name": instance.name, "path": str(path), "lines": found}


@command("version")
async def _version(server: ControlServer, request: Request) -> Any:
    return {"version": __version__, "protocol": protocol.PROTOCOL_VERSION}


@command("shutdown")
async def _shutdown(server: ControlServer, request: Request) -> Any:
    server._on_shutdown()
    return {"shutting_down": True}
