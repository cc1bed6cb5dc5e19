"""The ZeroMQ control server: decode, validate, dispatch, encode.

No business logic lives here; each command is a thin adapter from a request's
arguments to a :class:`~pdsupervisord.supervisor.Supervisor` method, and its
wire format is documented in ``docs/control-protocol.md``. Every request runs
in its own task, so a slow ``scale --wait`` never delays ``status``. Long
operations (start, stop, restart, reset, scale, reload) get an operation id;
without ``wait`` the reply comes at once and the outcome is published as a
``daemon.op_finished`` event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from pdsupervisord import __version__, protocol
from pdsupervisord.config import DaemonConfig
from pdsupervisord.errors import ConfigError, PlanError, ScaleError
from pdsupervisord.events import Event, encode
from pdsupervisord.logfiles import read_from, tail
from pdsupervisord.plan import InstanceSpec, Plan, plan_to_json
from pdsupervisord.protocol import ErrorCode, ProtocolError, Request
from pdsupervisord.states import State
from pdsupervisord.stats import TreeStats
from pdsupervisord.supervisor import (
    Supervisor,
    UnknownInstanceError,
    scale_result,
    settle_predicate,
)

__all__ = ["COMMANDS", "ControlServer", "EndpointRefusedError", "check_endpoint"]

log = structlog.get_logger("pdsupervisord.control")

Handler = Callable[["ControlServer", Request], Awaitable[Any]]
#: Every command, by wire name; each handler's docstring is its reference.
COMMANDS: dict[str, Handler] = {}

#: How long a background operation may take before it is reported unfinished.
OP_BUDGET = 3600.0


class EndpointRefusedError(ValueError):
    """Raised at start-up for an endpoint the daemon will not listen on."""


def check_endpoint(endpoint: str, daemon: DaemonConfig) -> None:
    """Refuse endpoints that would expose the control plane unauthenticated.

    ``ipc://`` is protected by file permissions. ``tcp://`` needs CurveZMQ
    (a server key pair and a directory of allowed client public keys), except
    ``tcp://127.0.0.1`` with the explicit ``allow_tcp_loopback`` opt-in.

    Raises:
        EndpointRefusedError: with what to configure instead.
    """
    if endpoint.startswith("ipc://"):
        return
    if not endpoint.startswith("tcp://"):
        raise EndpointRefusedError(f"unsupported endpoint {endpoint!r}")
    if daemon.curve_secret_key is not None:
        return
    host = endpoint.removeprefix("tcp://").rpartition(":")[0]
    if daemon.allow_tcp_loopback and host in ("127.0.0.1", "localhost", "[::1]"):
        return
    raise EndpointRefusedError(
        f"refusing {endpoint!r}: a tcp:// endpoint needs CurveZMQ "
        "([daemon] curve_secret_key and curve_authorized_keys), or, for "
        "tcp://127.0.0.1 only, [daemon] allow_tcp_loopback = true"
    )


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    """Create ipc socket files with tight modes (no window with looser bits)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def command(name: str) -> Callable[[Handler], Handler]:
    """Register a command handler under ``name``."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = handler
        return handler

    return register


class ControlServer:
    """ROUTER socket for requests, PUB socket for events."""

    def __init__(
        self,
        supervisor: Supervisor,
        daemon: DaemonConfig,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.supervisor = supervisor
        self.daemon = daemon
        self.endpoint = daemon.control
        self.events_endpoint = daemon.events
        self._on_shutdown = on_shutdown
        self._ctx = zmq.asyncio.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.PUB)
        self._auth: AsyncioAuthenticator | None = None
        self._send_lock = anyio.Lock()
        self._ops = itertools.count(1)
        self._tg: anyio.abc.TaskGroup | None = None
        self.stats = TreeStats()
        self.started_at = time.time()

    def bind(self) -> None:
        """Bind both sockets: ipc files 0600 (0660 with a control group).

        Raises:
            EndpointRefusedError: for an endpoint that needs CurveZMQ.
            zmq.ZMQError: when the address is in use or invalid.
            KeyError: when ``control_group`` names no group.
            OSError: when a CurveZMQ key file cannot be read.
        """
        for endpoint in (self.endpoint, self.events_endpoint):
            check_endpoint(endpoint, self.daemon)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if self.daemon.curve_secret_key is not None:
            self._enable_curve()
        group = self.daemon.control_group
        with _umask(0o117 if group else 0o177):
            for sock, endpoint in (
                (self._router, self.endpoint),
                (self._pub, self.events_endpoint),
            ):
                _remove_stale_ipc(endpoint)
                sock.bind(endpoint)
                if group and endpoint.startswith("ipc://"):
                    os.chown(
                        endpoint.removeprefix("ipc://"), -1, grp.getgrnam(group).gr_gid
                    )

    def _enable_curve(self) -> None:
        """Serve CurveZMQ; only clients whose public key is listed may connect."""
        assert self.daemon.curve_secret_key is not None
        assert self.daemon.curve_authorized_keys is not None
        public, secret = zmq.auth.load_certificate(self.daemon.curve_secret_key)
        if secret is None:
            raise OSError(f"{self.daemon.curve_secret_key} holds no secret key")
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(
            domain="*", location=str(self.daemon.curve_authorized_keys)
        )
        for sock in (self._router, self._pub):
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True

    def publish(self, event: Event) -> None:
        """Event sink: publish without blocking (PUB drops for slow readers)."""
        try:
            self._pub.send_multipart(encode(event), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("control.event_dropped", seq=event.seq)

    async def serve(self) -> None:
        """Answer requests until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                frames = await self._router.recv_multipart()
                if len(frames) < 2 or len(frames) > 4:
                    continue  # not a request we can route a reply to: drop it
                tg.start_soon(self._answer, frames)

    def close(self) -> None:
        """Close sockets and remove ipc files."""
        if self._auth is not None:
            self._auth.stop()
        self._router.close(0)
        self._pub.close(0)
        self._ctx.term()
        _remove_stale_ipc(self.endpoint)
        _remove_stale_ipc(self.events_endpoint)

    async def _answer(self, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        try:
            reply = await self.dispatch(payload)
        except Exception as exc:
            log.exception("control.dispatch_failed")
            reply = protocol.error_reply(None, ErrorCode.INTERNAL, repr(exc))
        async with self._send_lock:
            with contextlib.suppress(zmq.ZMQError):  # the peer went away
                await self._router.send_multipart([*envelope, reply])

    async def dispatch(self, payload: bytes) -> bytes:
        """Decode, run and encode one request; never raises."""
        try:
            request = protocol.decode_request(payload)
        except ProtocolError as exc:
            return protocol.error_reply(exc.request_id, exc.code, str(exc))
        handler = COMMANDS.get(request.command)
        if handler is None:
            known = ", ".join(sorted(COMMANDS))
            message = f"unknown command {request.command!r} (known: {known})"
            return protocol.error_reply(request.id, ErrorCode.UNKNOWN_COMMAND, message)
        try:
            result = await handler(self, request)
        except Exception as exc:
            code, message = self._describe(request, exc)
            return protocol.error_reply(request.id, code, message)
        return protocol.ok_reply(request.id, result)

    def _describe(self, request: Request, exc: Exception) -> tuple[str, str]:
        """Map an exception to (error code, message); log the unexpected ones."""
        if isinstance(exc, ProtocolError):
            return exc.code, str(exc)
        if isinstance(exc, UnknownInstanceError):
            names = ", ".join(self.supervisor.instances)
            return (
                ErrorCode.UNKNOWN_INSTANCE,
                f"no instance or role {exc.args[0]!r} (have: {names})",
            )
        if isinstance(exc, ScaleError):
            return ErrorCode.SCALE, str(exc)
        if isinstance(exc, ConfigError | PlanError):
            return ErrorCode.INVALID_CONFIG, str(exc)
        if isinstance(exc, FileNotFoundError):
            return ErrorCode.NOT_FOUND, str(exc)
        log.exception("control.handler_failed", command=request.command)
        return ErrorCode.INTERNAL, repr(exc)

    async def operation(
        self,
        request: Request,
        accepted: dict[str, Any],
        settle: Callable[[float], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """Give a long operation an id; wait for it, or report it later.

        The handler has already started the work (``accepted`` describes
        that). With ``wait`` > 0, ``settle(wait)`` runs before the reply, which
        carries its result; otherwise the reply is ``accepted`` at once and
        the settled result is published as a ``daemon.op_finished`` event.
        """
        op = f"op-{next(self._ops)}"
        wait = _wait(request)
        bus = self.supervisor.bus
        bus.emit(
            "daemon.op_started",
            reason="commanded",
            op=op,
            command=request.command,
            args=request.args,
        )
        if wait:
            result = await settle(wait)
            bus.emit("daemon.op_finished", reason="commanded", op=op, ok=True)
            return {"op": op, **result}

        async def finish() -> None:
            result = await settle(OP_BUDGET)
            bus.emit(
                "daemon.op_finished", reason="commanded", op=op, ok=True, result=result
            )

        assert self._tg is not None
        self._tg.start_soon(finish)
        return {"op": op, **accepted}


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
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number if kind in (int, float) else isinstance(value, kind)
    if kind is int and isinstance(value, float):
        ok = False
    if not ok:
        raise ProtocolError(
            ErrorCode.BAD_ARGS, f"argument {key!r} must be {kind.__name__}"
        )
    return value


def _wait(request: Request) -> float:
    """The optional ``wait`` argument: seconds to wait for the outcome."""
    value = _arg(request, "wait", float, 0.0)
    if not 0 <= value <= 3600:
        raise ProtocolError(ErrorCode.BAD_ARGS, "'wait' must be within 0..3600 s")
    return float(value)


def _state(request: Request) -> State:
    value = _arg(request, "state", str)
    try:
        return State(value)
    except ValueError:
        known = ", ".join(s.value for s in State)
        raise ProtocolError(
            ErrorCode.BAD_ARGS, f"unknown state {value!r} (known: {known})"
        ) from None


# ------------------------------------------------------------------- commands


@command("status")
async def _status(server: ControlServer, request: Request) -> Any:
    """``{name?}`` → ``{instances: [...], daemon: {...}}``; name may be a role."""
    name = _arg(request, "name", str, None)
    supervisor = server.supervisor
    instances = supervisor.select(name) if name else supervisor.ordered()
    return {
        "instances": [i.status() for i in instances],
        "daemon": {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "config": str(supervisor.topo.source),
            "uptime": time.time() - server.started_at,
            "summary": supervisor.summary(),
            "broken_pairs": [
                {"prefill": p, "decode": d, "error": error}
                for (p, d), error in supervisor.broken_pairs.items()
            ],
        },
    }


def _instance_command(verb: str) -> Handler:
    async def handler(server: ControlServer, request: Request) -> Any:
        supervisor = server.supervisor
        targets = supervisor.select(_arg(request, "name", str))
        method = getattr(supervisor, verb)
        for instance in targets:
            await method(instance.name, 0.0)
        done = settle_predicate(verb)

        async def settle(wait: float) -> dict[str, Any]:
            async with anyio.create_task_group() as tg:
                for instance in targets:
                    tg.start_soon(instance.wait_for, done, wait)
            return {"instances": [i.status() for i in targets]}

        accepted = {"instances": [i.status() for i in targets]}
        return await server.operation(request, accepted, settle)

    handler.__doc__ = (
        f"``{{name, wait?}}`` → ``{{op, instances: [...]}}``: {verb} an instance, "
        "or every instance of a role."
    )
    return handler


for _verb in ("start", "stop", "restart", "reset"):
    command(_verb)(_instance_command(_verb))


@command("scale")
async def _scale(server: ControlServer, request: Request) -> Any:
    """``{role, count, wait?}`` → ``{op, role, count, added, removed}``."""
    role = _arg(request, "role", str)
    if role not in ("prefill", "decode"):
        raise ProtocolError(ErrorCode.BAD_ARGS, "'role' must be prefill or decode")
    count = _arg(request, "count", int)
    supervisor = server.supervisor
    changed = await supervisor.rescale(role, count)
    result = scale_result(role, count, changed)

    async def settle(wait: float) -> dict[str, Any]:
        await supervisor.wait_settled(changed, wait)
        return result

    return await server.operation(request, result, settle)


@command("reload")
async def _reload(server: ControlServer, request: Request) -> Any:
    """``{wait?}`` → ``{op, unchanged, restart, remove, add, ignored}``.

    Error ``invalid_config`` (and nothing changes) when the file is invalid.
    """
    supervisor = server.supervisor
    diff: dict[str, Any] = dict(await supervisor.reload_file())

    async def settle(wait: float) -> dict[str, Any]:
        await supervisor.wait_reloaded(wait)
        return diff

    return await server.operation(request, diff, settle)


@command("tail")
async def _tail(server: ControlServer, request: Request) -> Any:
    """``{name, lines?, offset?}`` → ``{name, path, lines, offset}``.

    Without ``offset``: the last ``lines`` lines. With ``offset`` (from an
    earlier reply): the lines written since, for ``tail -f``.
    """
    instance = server.supervisor.get(_arg(request, "name", str))
    path = instance.log_file.path
    offset = _arg(request, "offset", int, None)
    if offset is not None:
        lines, end = await anyio.to_thread.run_sync(read_from, path, offset)
        return {"name": instance.name, "path": str(path), "lines": lines, "offset": end}
    count = _arg(request, "lines", int, 50)
    if not 0 <= count <= 10_000:
        raise ProtocolError(ErrorCode.BAD_ARGS, "'lines' must be within 0..10000")
    found = await anyio.to_thread.run_sync(tail, path, count)
    size = path.stat().st_size if path.exists() else 0
    return {"name": instance.name, "path": str(path), "lines": found, "offset": size}


@command("stats")
async def _stats(server: ControlServer, request: Request) -> Any:
    """``{name?}`` → ``{instances: [{name, pids, processes, cpu_percent, rss_bytes}]}``.

    CPU is measured since the previous ``stats`` call (the first reads 0).
    """
    name = _arg(request, "name", str, None)
    supervisor = server.supervisor
    instances = supervisor.select(name) if name else supervisor.ordered()
    trees = {i.name: i.child.pid for i in instances if i.child is not None}
    measured = await anyio.to_thread.run_sync(server.stats.measure, trees)
    return {
        "instances": [
            {"name": i.name, "state": i.state.value, **measured.get(i.name, _no_tree())}
            for i in instances
        ],
        "daemon": await anyio.to_thread.run_sync(server.stats.measure_self),
    }


def _no_tree() -> dict[str, Any]:
    return {"pids": [], "processes": 0, "cpu_percent": 0.0, "rss_bytes": 0}


@command("config")
async def _config(server: ControlServer, request: Request) -> Any:
    """``{}`` → ``{source, topology, plan}``: the effective topology and the
    current plan (scaled instances included)."""
    supervisor = server.supervisor
    specs = [i.spec for i in supervisor.ordered()]
    return {
        "source": str(supervisor.topo.source),
        "topology": _jsonable(dataclasses.asdict(supervisor.topo)),
        "plan": plan_to_json_specs(specs),
    }


def plan_to_json_specs(specs: list[InstanceSpec]) -> dict[str, Any]:
    """The ``--print-plan --json`` form of the specs now running."""
    return plan_to_json(Plan(tuple(specs)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@command("wait")
async def _wait_for(server: ControlServer, request: Request) -> Any:
    """``{name, state, timeout}`` → the instance's status once in ``state``.

    Error ``timeout`` when it is not reached in time.
    """
    instance = server.supervisor.get(_arg(request, "name", str))
    state = _state(request)
    timeout = float(_arg(request, "timeout", float, 60.0))
    if not 0 <= timeout <= 3600:
        raise ProtocolError(ErrorCode.BAD_ARGS, "'timeout' must be within 0..3600 s")
    if not await instance.wait_for(lambda s: s is state, timeout):
        now = instance.state.value
        message = f"{instance.name} is {now}, not {state.value}, after {timeout:g} s"
        raise ProtocolError(ErrorCode.TIMEOUT, message)
    return instance.status()


@command("version")
async def _version(server: ControlServer, request: Request) -> Any:
    """``{}`` → ``{version, protocol}``."""
    return {"version": __version__, "protocol": protocol.PROTOCOL_VERSION}


@command("shutdown")
async def _shutdown(server: ControlServer, request: Request) -> Any:
    """``{}`` → ``{shutting_down: true}``; the daemon then stops everything."""
    server._on_shutdown()
    return {"shutting_down": True}
