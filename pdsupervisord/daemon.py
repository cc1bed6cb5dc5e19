"""``pdsupervisord``: the daemon's entry point.

Parses arguments, loads the topology, configures logging (the only place that
does), takes the run directory's lock, kills whatever a crashed predecessor
left behind, then runs the supervisor and the control server in one anyio
task group until SIGTERM, SIGINT or a ``shutdown`` command. Speaks systemd's
notify protocol when started with ``Type=notify``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import anyio
import structlog
import zmq

from pdsupervisord import __version__, checks, tools
from pdsupervisord import config as config_module
from pdsupervisord.config import Topology
from pdsupervisord.control import ControlServer, EndpointRefusedError
from pdsupervisord.errors import ConfigError, PdsError, PlanError
from pdsupervisord.events import EventBus
from pdsupervisord.plan import initial_plan, plan_to_json, render_shell
from pdsupervisord.sdnotify import Notifier
from pdsupervisord.statefile import StateFile, kill_leftovers
from pdsupervisord.supervisor import Supervisor

STATE_FILE = "state.json"

__all__ = ["configure_logging", "main"]

log = structlog.get_logger("pdsupervisord.daemon")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def configure_logging(style: str = "auto") -> None:
    """Send structlog events to stderr: JSON lines, or console on a TTY.

    Args:
        style: ``json``, ``console`` or ``auto`` (console only on a TTY, so
            journald and log shippers get one JSON object per line).
    """
    console = style == "console" or (style == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdsupervisord",
        description="Supervise a prefill/decode disaggregated vLLM topology.",
    )
    parser.add_argument("-c", "--config", required=True, help="topology TOML file")
    parser.add_argument(
        "--print-plan",
        action="store_true",
        help="print each instance's environment and command, then exit",
    )
    parser.add_argument(
        "--json", action="store_true", help="with --print-plan: print JSON"
    )
    parser.add_argument(
        "--log-format", choices=("auto", "json", "console"), default="auto"
    )
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon (or print the plan); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in tools.COMMANDS:  # pdsupervisord ranktable|check ...
        return tools.main(argv)
    args = _parser().parse_args(argv)
    try:
        topo = config_module.load(args.config)
        plan = initial_plan(topo)
    except (ConfigError, PlanError) as exc:
        print(f"pdsupervisord: invalid topology\n{exc}", file=sys.stderr)
        return EXIT_CONFIG

    if args.print_plan:
        if args.json:
            print(json.dumps(plan_to_json(plan), indent=2))
        else:
            print(render_shell(plan), end="")
        return EXIT_OK

    configure_logging(args.log_format)
    try:
        return anyio.run(_serve, topo, backend="asyncio")
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_RUNTIME


async def _serve(topo: Topology) -> int:
    """Run until asked to stop; returns the exit code."""
    daemon = topo.daemon
    daemon.run_dir.mkdir(parents=True, exist_ok=True)
    daemon.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock_run_dir(daemon.run_dir)
    except RunDirBusyError as exc:
        log.error("daemon.already_running", run_dir=str(daemon.run_dir), error=str(exc))
        return EXIT_RUNTIME

    with lock:
        leftovers = kill_leftovers(daemon.run_dir / STATE_FILE)
        # Topology checks, rank table and NPU pre-flight: before a 5-minute
        # model load, not after it.
        if not checks.log_findings(await checks.before_first_start(topo)):
            log.error("daemon.refused", reason="preflight_failed")
            return EXIT_CONFIG
        bus = EventBus()
        state = StateFile(daemon.run_dir / STATE_FILE)
        supervisor = Supervisor(topo, bus, state)
        stop = anyio.Event()
        server = ControlServer(supervisor, daemon, stop.set)
        try:
            server.bind()
        except (EndpointRefusedError, zmq.ZMQError, KeyError, OSError) as exc:
            log.error("daemon.bind_failed", endpoint=daemon.control, error=str(exc))
            return EXIT_RUNTIME
        bus.subscribe(server.publish)
        notifier = Notifier()
        bus.subscribe(lambda _: notifier.send(STATUS=supervisor.summary()))
        log.info(
            "daemon.started",
            version=__version__,
            config=str(topo.source),
            control=daemon.control,
            events=daemon.events,
        )
        if leftovers:
            bus.emit("daemon.leftovers_killed", reason="previous_run", killed=leftovers)
        try:
            await _run(supervisor, server, notifier, stop)
        finally:
            server.close()
        state.remove()
    log.info("daemon.stopped")
    return EXIT_OK


async def _run(
    supervisor: Supervisor, server: ControlServer, notifier: Notifier, stop: anyio.Event
) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        tg.start_soon(_watch_signals, supervisor, notifier, stop)
        if notifier.watchdog_interval:
            tg.start_soon(_watchdog, notifier, notifier.watchdog_interval)
        await tg.start(supervisor.run)
        tg.start_soon(_notify_ready, supervisor, notifier)
        await stop.wait()
        notifier.send(STOPPING=1, STATUS="stopping")
        await supervisor.shutdown()
        tg.cancel_scope.cancel()


async def _notify_ready(supervisor: Supervisor, notifier: Notifier) -> None:
    """READY=1 once the control socket is up and the topology has started."""
    await supervisor.ready_event.wait()
    notifier.send(READY=1, STATUS=supervisor.summary())


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """Ping systemd's watchdog from the event loop: a wedged loop stops pinging."""
    while True:
        notifier.send(WATCHDOG=1)
        await anyio.sleep(interval)


class RunDirBusyError(PdsError):
    """Raised when another daemon holds the run directory's lock."""


def _lock_run_dir(run_dir: Path) -> IO[str]:
    """Take the run directory's lock so two daemons never share one topology.

    Raises:
        RunDirBusyError: naming the pid of the daemon holding it.
    """
    handle = open(run_dir / "pdsupervisord.lock", "a+")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise RunDirBusyError(
            f"another pdsupervisord (pid {holder}) is running with this run_dir"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


async def _watch_signals(
    supervisor: Supervisor, notifier: Notifier, stop: anyio.Event
) -> None:
    """SIGTERM/SIGINT stop; SIGHUP reloads the topology; SIGUSR2 reopens logs."""
    signals_wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
    with anyio.open_signal_receiver(*signals_wanted) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("daemon.signal", signal=name)
            if signum == signal.SIGHUP:
                await _reload(supervisor, notifier)
            elif signum == signal.SIGUSR2:
                supervisor.reopen_logs()
            else:
                stop.set()


async def _reload(supervisor: Supervisor, notifier: Notifier) -> None:
    notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
    try:
        await supervisor.reload_file()
    except (ConfigError, PlanError) as exc:
        log.error("daemon.reload_rejected", error=str(exc))
    notifier.send(READY=1, STATUS=supervisor.summary())


if __name__ == "__main__":
    sys.exit(main())
