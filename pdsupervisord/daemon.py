"""``pdsupervisord``: the daemon's entry point.

Parses arguments, loads the topology, configures logging (the only place that
does), then runs the supervisor and the control server in one anyio task
group until SIGTERM, SIGINT or a ``shutdown`` command.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

import anyio
import structlog
import zmq

from pdsupervisord import __version__
from pdsupervisord import config as config_module
from pdsupervisord.config import Topology
from pdsupervisord.control import ControlServer, EndpointRefusedError
from pdsupervisord.errors import ConfigError, PlanError
from pdsupervisord.events import EventBus
from pdsupervisord.plan import initial_plan, plan_to_json, render_shell
from pdsupervisord.supervisor import Supervisor

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
    topo.daemon.run_dir.mkdir(parents=True, exist_ok=True)
    topo.daemon.log_dir.mkdir(parents=True, exist_ok=True)
    bus = EventBus()
    supervisor = Supervisor(topo, bus)
    stop = anyio.Event()
    server = ControlServer(
        supervisor, topo.daemon.control, topo.daemon.events, stop.set
    )
    try:
        server.bind()
    except (EndpointRefusedError, zmq.ZMQError) as exc:
        log.error("daemon.bind_failed", endpoint=topo.daemon.control, error=str(exc))
        return EXIT_RUNTIME
    bus.subscribe(server.publish)
    log.info(
        "daemon.started",
        version=__version__,
        config=str(topo.source),
        control=topo.daemon.control,
        events=topo.daemon.events,
    )

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            tg.start_soon(_watch_signals, stop)
            await tg.start(supervisor.run)
            await stop.wait()
            await supervisor.shutdown()
            tg.cancel_scope.cancel()
    finally:
        server.close()
    log.info("daemon.stopped")
    return EXIT_OK


async def _watch_signals(stop: anyio.Event) -> None:
    """SIGTERM/SIGINT stop the daemon; SIGHUP is logged and ignored for now."""
    with anyio.open_signal_receiver(
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP
    ) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                # Reloading the topology is not implemented yet; ignoring
                # SIGHUP keeps a terminal hang-up from killing the daemon.
                log.warning("daemon.reload_unsupported", signal="SIGHUP")
                continue
            log.info("daemon.signal", signal=signal.Signals(signum).name)
            stop.set()


if __name__ == "__main__":
    sys.exit(main())
