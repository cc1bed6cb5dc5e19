"""Command line of the proxy: ``python -m pdsupervisord.proxy``.

The flags of vllm-ascend's example proxy are accepted as they are, so the
proxy is a drop-in for it; the rest are this proxy's own. The membership
API's token is read from the environment, never from argv, so that it does
not show in ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import structlog
from aiohttp import web

from pdsupervisord.proxy.admin import ADMIN_TOKEN_ENV
from pdsupervisord.proxy.app import build_app
from pdsupervisord.proxy.backends import Address
from pdsupervisord.proxy.health import ProbeSettings
from pdsupervisord.proxy.settings import ProxySettings

__all__ = ["build_parser", "configure_logging", "main", "parse_settings", "serve"]

_log = structlog.get_logger("pdsupervisord.proxy")

_DEFAULTS = ProxySettings()
# In-flight requests get this long to finish when the proxy is stopped.
_SHUTDOWN_GRACE_S = 10.0
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_IGNORED_FLAGS = ("workers", "max_waiting_retries", "waiting_retry_interval")
# Used when ports are given without hosts.
_DEFAULT_BACKEND_HOST = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    """The proxy's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m pdsupervisord.proxy",
        description="Prefill/decode disaggregation proxy for vLLM.",
        epilog=f"The membership API's token is read from ${ADMIN_TOKEN_ENV}.",
    )
    parser.add_argument("--host", default=_DEFAULTS.host, help="listen address")
    parser.add_argument(
        "--port", type=_port, default=_DEFAULTS.port, help="listen port (0: any)"
    )
    _add_backend_flags(parser, "prefiller")
    _add_backend_flags(parser, "decoder")
    _add_retry_flags(parser)
    _add_health_flags(parser)
    parser.add_argument(
        "--allow-decode-prefill-fallback",
        action="store_true",
        help="when a prefiller returns no kv_transfer_params, let the decoder "
        "prefill (logged as a warning each time) instead of answering 502",
    )
    parser.add_argument(
        "--served-model-name", help="model id /v1/models reports if no decoder does"
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=_DEFAULTS.max_request_bytes,
        help="largest accepted request body (default: %(default)s)",
    )
    parser.add_argument(
        "--admin-token-optional",
        action="store_true",
        help=f"leave the membership API open when ${ADMIN_TOKEN_ENV} is unset "
        "(default: disabled, 403)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default=_DEFAULTS.event_loop,
        help="auto: uvloop when it is installed; uvloop is optional and measured "
        "no consistent gain (docs/proxy.md, Speed) (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        default=_DEFAULTS.log_level,
        choices=sorted(_LOG_LEVELS),
        help="(default: %(default)s)",
    )
    _add_ignored_flags(parser)
    return parser


def _add_ignored_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the example proxy that mean nothing here, accepted for drop-in.

    One asyncio process serves every request, so there are no workers; added
    instances are used at once (a refusing one is ejected and tried again
    after the cool-down), so there is no waiting list.
    """
    group = parser.add_argument_group("accepted for compatibility, ignored")
    group.add_argument("--workers", type=int, metavar="N")
    group.add_argument("--max-waiting-retries", type=int, metavar="N")
    group.add_argument("--waiting-retry-interval", type=float, metavar="S")


def _add_backend_flags(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        f"--{role}-hosts",
        f"--{role}-host",
        nargs="+",
        default=[],
        metavar="HOST",
        help=f"{role} hosts; one host applies to all ports",
    )
    parser.add_argument(
        f"--{role}-ports",
        f"--{role}-port",
        nargs="+",
        type=_port,
        default=[],
        metavar="PORT",
        help=f"{role} ports; none: start without {role}s",
    )


def _add_retry_flags(parser: argparse.ArgumentParser) -> None:
    numbers = [
        ("--max-retries", _non_negative_int, "retries per request after a failure"),
        ("--retry-delay", _positive_float, "seconds before the first retry (doubles)"),
        ("--connect-timeout", _positive_float, "seconds to connect to a backend"),
        ("--prefill-timeout", _positive_float, "seconds for a whole prefill leg"),
        ("--read-timeout", _positive_float, "seconds a decoder may stay silent"),
        ("--eject-cooldown", _positive_float, "seconds a refusing backend is skipped"),
    ]
    for flag, kind, text in numbers:
        default = getattr(_DEFAULTS, flag.removeprefix("--").replace("-", "_"))
        parser.add_argument(
            flag, type=kind, default=default, help=f"{text} (default: %(default)s)"
        )


def _add_health_flags(parser: argparse.ArgumentParser) -> None:
    probes = _DEFAULTS.probes
    group = parser.add_argument_group("active health probes (GET /health)")
    group.add_argument(
        "--health-check-interval",
        type=_non_negative_float,
        default=probes.period,
        metavar="S",
        help="seconds between probes of each backend; 0: no probes "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--health-check-timeout",
        type=_positive_float,
        default=probes.timeout,
        metavar="S",
        help="seconds one probe may take (default: %(default)s)",
    )
    group.add_argument(
        "--health-failure-threshold",
        type=_positive_int,
        default=probes.failure_threshold,
        metavar="N",
        help="failed probes in a row that eject a backend (default: %(default)s)",
    )
    group.add_argument(
        "--health-success-threshold",
        type=_positive_int,
        default=probes.success_threshold,
        metavar="N",
        help="passed probes in a row that bring it back (default: %(default)s)",
    )


def parse_settings(
    argv: Sequence[str] | None, environ: Mapping[str, str]
) -> ProxySettings:
    """Settings from the command line and the environment.

    Raises:
        SystemExit: a flag is invalid (argparse prints why, exit status 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    token = environ.get(ADMIN_TOKEN_ENV) or None
    ignored = tuple(
        "--" + name.replace("_", "-")
        for name in _IGNORED_FLAGS
        if getattr(args, name) is not None
    )
    return ProxySettings(
        host=args.host,
        port=args.port,
        prefill=_addresses(
            parser, "prefiller", args.prefiller_hosts, args.prefiller_ports
        ),
        decode=_addresses(parser, "decoder", args.decoder_hosts, args.decoder_ports),
        max_retries=args.max_retries,
        retry_delay=args.retry_delay,
        connect_timeout=args.connect_timeout,
        prefill_timeout=args.prefill_timeout,
        read_timeout=args.read_timeout,
        eject_cooldown=args.eject_cooldown,
        probes=ProbeSettings(
            period=args.health_check_interval,
            timeout=args.health_check_timeout,
            failure_threshold=args.health_failure_threshold,
            success_threshold=args.health_success_threshold,
        ),
        allow_decode_prefill_fallback=args.allow_decode_prefill_fallback,
        served_model_name=args.served_model_name,
        max_request_bytes=args.max_request_bytes,
        admin_token=token,
        admin_token_optional=args.admin_token_optional,
        log_level=args.log_level,
        event_loop=args.event_loop,
        ignored_flags=ignored,
    )


def _addresses(
    parser: argparse.ArgumentParser, role: str, hosts: list[str], ports: list[int]
) -> tuple[Address, ...]:
    """Pair hosts with ports; one host serves all ports, and the reverse."""
    if not ports:
        if hosts:
            parser.error(f"--{role}-hosts given without --{role}-ports")
        return ()
    hosts = hosts or [_DEFAULT_BACKEND_HOST]
    if len(hosts) == 1:
        hosts = hosts * len(ports)
    elif len(ports) == 1:
        ports = ports * len(hosts)
    if len(hosts) != len(ports):
        parser.error(
            f"{len(hosts)} --{role}-hosts for {len(ports)} --{role}-ports: "
            "give one host, one port, or as many of each"
        )
    if 0 in ports:
        parser.error(f"--{role}-ports must be in 1..65535")
    return tuple(Address(host, port) for host, port in zip(hosts, ports, strict=True))


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0..65535)")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive_float(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def configure_logging(level: str) -> None:
    """Send structlog output to stderr: JSON lines unless stderr is a TTY.

    Raises:
        KeyError: the level is not one of debug, info, warning, error.
    """
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if sys.stderr.isatty():
        processors.append(structlog.dev.ConsoleRenderer())
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LOG_LEVELS[level]),
        # WriteLogger: one write and flush per line, cheaper than print().
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


async def serve(settings: ProxySettings, loop_name: str = "asyncio") -> None:
    """Serve until SIGINT or SIGTERM, then let in-flight requests finish.

    Args:
        settings: what to serve and how.
        loop_name: the running event loop's name, for the start-up log line.

    Raises:
        OSError: the listen address cannot be bound.
    """
    runner = web.AppRunner(
        build_app(settings),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=_SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        _log.info(
            "proxy.listening",
            host=host,
            port=port,
            prefill=[str(a) for a in settings.prefill],
            decode=[str(a) for a in settings.decode],
            admin_api=_admin_mode(settings),
            event_loop=loop_name,
            ignored_flags=list(settings.ignored_flags),
        )
        await _stop_requested()
    finally:
        await runner.cleanup()
    _log.info("proxy.stopped")


def _admin_mode(settings: ProxySettings) -> str:
    if settings.admin_token is not None:
        return "token"
    return "open" if settings.admin_token_optional else "disabled"


async def _stop_requested() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


Runner = Callable[[Coroutine[Any, Any, None]], None]


def event_loop_runner(choice: str) -> tuple[Runner, str]:
    """The function that runs the proxy's main coroutine, and its loop's name.

    Args:
        choice: ``asyncio``, ``uvloop``, or ``auto`` (uvloop when importable).

    Raises:
        ImportError: ``uvloop`` was asked for and is not installed.
    """
    if choice == "asyncio":
        return asyncio.run, "asyncio"
    try:
        # Imported by name: uvloop is optional (the bench extra installs it).
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise
        return asyncio.run, "asyncio"
    runner: Runner = uvloop.run
    return runner, "uvloop"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy; returns the process exit status."""
    settings = parse_settings(argv, os.environ)
    configure_logging(settings.log_level)
    try:
        runner, loop_name = event_loop_runner(settings.event_loop)
    except ImportError:
        _log.error("proxy.start_failed", error="--event-loop uvloop: not installed")
        return 2
    try:
        runner(serve(settings, loop_name))
    except OSError as exc:
        _log.error(
            "proxy.start_failed", host=settings.host, port=settings.port, error=str(exc)
        )
        return 1
    return 0
