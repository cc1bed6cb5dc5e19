"""The API server process: start-up, serving, and the ways it ends.

Design note on exits. A supervisor classifies an instance by how it ends, so
each ending copies what vLLM does (facts §5, §8):

- SIGTERM or SIGINT while loading: stop the engine child, exit 130 (vLLM
  ends by SIGINT then). When the whole process group is signalled the engine
  child may die first; its end of file is then given 0.2 s to turn out to be
  part of the same stop before it counts as a failed start.
- Engine child fails to start (device busy) or crashes while loading: exit 1.
- API port already bound: exit 1 (``Address already in use``) before the
  load, because the port is bound first and only listened on once loaded,
  as vLLM 0.32 does (connections are refused meanwhile).
- SIGTERM or SIGINT once serving: close the port, stop the engine child
  (SIGTERM, SIGKILL after 5 s), exit 0.
- Engine child dies while serving: ``/health`` answers 503 at once, and the
  server exits by itself ``PDSD_ENGINE_DEATH_EXIT_SECONDS`` later with
  status 0, the misleading code vLLM 0.32 uses.
- SIGKILL: nothing runs; the engine child lives on as an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from aiohttp import web
from structlog.typing import FilteringBoundLogger

from pdsupervisord.engine import logs
from pdsupervisord.engine.channel import EngineSpec
from pdsupervisord.engine.engine_client import EngineClient
from pdsupervisord.engine.errors import EngineConfigError, EngineStartError
from pdsupervisord.engine.metrics import EngineMetrics
from pdsupervisord.engine.scheduler import Scheduler
from pdsupervisord.engine.server import build_app
from pdsupervisord.engine.settings import Settings, load_settings
from pdsupervisord.engine.state import ApiState

__all__ = ["EXIT_INTERRUPTED", "run", "serve"]

#: Exit status when stopped during model load: 128 + SIGINT, as vLLM.
EXIT_INTERRUPTED = 130

#: Seconds in-flight requests get when the server stops; streams still
#: running after that are cut, as vLLM cuts them.
SHUTDOWN_GRACE = 0.5

#: How long an engine child's death during load may precede the stop signal
#: that caused it (see the module docstring). A guess; signals delivered to
#: a process group arrive within microseconds of each other.
SIGNAL_RACE_WINDOW = 0.2

_log: FilteringBoundLogger = structlog.get_logger("engine.api")


class _StopSignal:
    """Turns SIGTERM and SIGINT into an event, remembering which came first."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.name: str | None = None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._received, signum)

    def _received(self, signum: signal.Signals) -> None:
        if self.name is None:
            self.name = signum.name
            _log.info("api.signal", signal=signum.name)
        self.event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a signal up to ``timeout`` seconds; True if one came."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        return self.event.is_set()


def run(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Configure logging, read the configuration and serve until stopped.

    Returns:
        The exit status (see the module docstring); 1 on an invalid knob,
        fault switch or KV config.

    Raises:
        SystemExit: Status 2 on a bad command line.
    """
    logs.configure("APIServer")
    try:
        settings = load_settings(argv, env)
    except EngineConfigError as exc:
        _log.error("api.config_invalid", error=str(exc))
        return 1
    return asyncio.run(serve(settings))


async def serve(settings: Settings) -> int:
    """Run the API server until it stops.

    Returns:
        The exit status (see the module docstring).
    """
    stop = _StopSignal()
    _log.info(
        "api.starting",
        model=settings.args.model,
        served_model_names=list(settings.args.served_model_names),
        port=settings.args.port,
        kv_connector=settings.kv.connector if settings.kv else None,
        kv_role=settings.kv.role.value if settings.kv else None,
        faults=list(settings.faults.active),
        ignored_flags=list(settings.args.ignored),
    )
    args = settings.args
    try:
        sock = _bind(args.host, args.port, reuse_port=settings.faults.reuseport)
    except OSError as exc:
        _log.error("api.bind_failed", host=args.host, port=args.port, error=str(exc))
        return 1
    with sock:
        return await _load_and_serve(settings, sock, stop)


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """Bind the API socket without listening: connections are refused.

    Raises:
        OSError: When the address is taken or cannot be resolved.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _load_and_serve(
    settings: Settings, sock: socket.socket, stop: _StopSignal
) -> int:
    engine = await EngineClient.spawn(_engine_spec(settings))
    failed = await _load(settings, engine, stop)
    if failed is not None:
        return failed

    state = ApiState(
        settings=settings,
        engine=engine,
        metrics=EngineMetrics(settings.args.served_model_names[0]),
        scheduler=Scheduler(settings.args.max_num_seqs),
    )
    runner = web.AppRunner(build_app(state), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        return await _open_and_serve(runner, sock, state, stop)
    finally:
        await runner.cleanup()
        await engine.stop()


def _engine_spec(settings: Settings) -> EngineSpec:
    channel = settings.side_channel
    return EngineSpec(
        devices=settings.devices,
        lock_dir=str(settings.knobs.lock_dir),
        load_seconds=settings.knobs.load_seconds,
        kv_timeout=settings.knobs.kv_timeout,
        kv_host=channel.host if channel else None,
        kv_ports=channel.ports if channel else (),
        setsid=settings.faults.engine_setsid,
        link_down=settings.faults.kv_link_down,
    )


async def _load(
    settings: Settings, engine: EngineClient, stop: _StopSignal
) -> int | None:
    """Wait for the engine child to load.

    Returns:
        None when loaded, else the exit status to end with (the engine child
        is already stopped then).
    """
    ready = asyncio.ensure_future(engine.wait_ready())
    signalled = asyncio.ensure_future(stop.event.wait())
    await asyncio.wait({ready, signalled}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()

    if stop.event.is_set():
        ready.cancel()
        code: int | None = EXIT_INTERRUPTED
    else:
        code = await _load_outcome(settings, ready, stop)

    if code == EXIT_INTERRUPTED:
        _log.warning("api.interrupted_during_load", signal=stop.name)
    if code is not None:
        await engine.stop()
    return code


async def _load_outcome(
    settings: Settings, ready: asyncio.Future[dict[str, Any]], stop: _StopSignal
) -> int | None:
    try:
        ready.result()
    except EngineStartError as exc:
        if await stop.wait(SIGNAL_RACE_WINDOW):
            return EXIT_INTERRUPTED
        _log.error("api.engine_start_failed", error=str(exc))
        return 1

    faults = settings.faults
    if faults.crash_at_start:
        _log.error(
            "api.model_load_failed", error="simulated crash (fault crash_at_start)"
        )
        return 1
    if faults.hang_at_start:
        _log.warning("fault.hang_at_start", consequence="API port never opens")
        await stop.wait()
        return EXIT_INTERRUPTED
    return None


async def _open_and_serve(
    runner: web.AppRunner, sock: socket.socket, state: ApiState, stop: _StopSignal
) -> int:
    args, faults = state.settings.args, state.settings.faults
    site = web.SockSite(runner, sock, shutdown_timeout=SHUTDOWN_GRACE)
    try:
        await site.start()  # listen(): another socket bound meanwhile fails it
    except OSError as exc:
        _log.error("api.bind_failed", host=args.host, port=args.port, error=str(exc))
        return 1
    _log.info("api.ready", host=args.host, port=args.port, engine_pid=state.engine.pid)

    if faults.orphan_engine:
        _log.error("fault.orphan_engine", engine_pid=state.engine.pid, exit_code=1)
        os._exit(1)
    return await _serve_until_done(state, stop)


async def _serve_until_done(state: ApiState, stop: _StopSignal) -> int:
    waits = {
        asyncio.ensure_future(stop.event.wait()),
        asyncio.ensure_future(state.engine.dead.wait()),
        asyncio.ensure_future(state.fault_exit.wait()),
    }
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiter in pending:
        waiter.cancel()

    if stop.event.is_set():
        _log.info("api.stopping", signal=stop.name)
        return 0
    if state.fault_exit.is_set():
        _log.error("fault.exit_after", served=state.served, exit_code=1)
        return 1

    code = await state.engine.exit_code(timeout=1.0)
    linger = state.settings.knobs.death_exit_seconds
    _log.error("api.engine_died", engine_exit_code=code, exit_in_s=linger)
    await stop.wait(linger)
    _log.info("api.exiting", reason="engine core died", exit_code=0)
    return 0
