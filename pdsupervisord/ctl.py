"""``pdsupervisorctl``: the command-line client of the control socket.

Exit codes: 0 success, 1 the daemon answered with an error, 2 usage or
topology error, 3 the daemon did not answer in time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pdsupervisord import config as config_module
from pdsupervisord.client import Client
from pdsupervisord.errors import ConfigError, ControlError, DaemonUnreachableError

__all__ = ["format_status", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdsupervisorctl", description="Control a running pdsupervisord."
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help="topology file (to find the socket)")
    where.add_argument(
        "-s", "--socket", help="control endpoint, e.g. ipc:///run/x.sock"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for an answer"
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON results")
    sub = parser.add_subparsers(dest="command", required=True)

    status = sub.add_parser("status", help="show instances")
    status.add_argument("name", nargs="?", help="an instance name or a role")
    status.add_argument("--json", action="store_true", dest="json_sub")

    scale = sub.add_parser("scale", help="set the number of instances of a role")
    scale.add_argument("role", choices=("prefill", "decode"))
    scale.add_argument("count", type=int)
    _add_wait(scale)

    for name, text in (
        ("start", "start an instance"),
        ("stop", "stop an instance (drained from the proxy first)"),
        ("restart", "stop then start an instance"),
        ("reset", "clear fatal/exited and start again"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("name")
        _add_wait(cmd)

    reload = sub.add_parser("reload", help="re-read the topology file and apply it")
    _add_wait(reload)
    tail = sub.add_parser("tail", help="last lines of an instance's log")
    tail.add_argument("name")
    tail.add_argument("-n", "--lines", type=int, default=50)

    sub.add_parser("shutdown", help="stop everything and exit the daemon")
    sub.add_parser("version", help="daemon and protocol version")
    return parser


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait", action="store_true", help="return once the command is accepted"
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the outcome (default 600)",
    )


def _endpoint(args: argparse.Namespace) -> str:
    """The control endpoint from -s, -c, or $PDSUPERVISORD_CONFIG.

    Raises:
        ConfigError: when the topology file is invalid.
        SystemExit: (usage) when neither is given.
    """
    if args.socket:
        return str(args.socket)
    path = args.config or os.environ.get("PDSUPERVISORD_CONFIG")
    if not path:
        _parser().error("give -c FILE or -s ENDPOINT (or set PDSUPERVISORD_CONFIG)")
    return config_module.load(path).daemon.control


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any], float]:
    """Map parsed arguments to (command, args, reply timeout)."""
    if args.command == "status":
        return "status", ({"name": args.name} if args.name else {}), args.timeout
    if args.command == "tail":
        return "tail", {"name": args.name, "lines": args.lines}, args.timeout
    if args.command in ("start", "stop", "restart", "reset", "scale", "reload"):
        body: dict[str, Any] = {}
        if args.command == "scale":
            body = {"role": args.role, "count": args.count}
        elif args.command != "reload":
            body = {"name": args.name}
        if args.no_wait:
            return args.command, body, args.timeout
        body["wait"] = args.wait_timeout
        return args.command, body, args.wait_timeout + args.timeout
    return args.command, {}, args.timeout


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        endpoint = _endpoint(args)
    except ConfigError as exc:
        print(f"pdsupervisorctl: invalid topology\n{exc}", file=sys.stderr)
        return EXIT_USAGE

    command, body, timeout = _request(args)
    try:
        with Client(endpoint, timeout=timeout) as client:
            result = client.call(command, **body)
    except DaemonUnreachableError as exc:
        print(f"pdsupervisorctl: daemon unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"pdsupervisorctl: {exc}", file=sys.stderr)
        return EXIT_ERROR

    as_json = args.json or getattr(args, "json_sub", False)
    print(_render(command, result, as_json))
    return EXIT_OK


def _render(command: str, result: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(result, indent=2)
    if command == "status":
        return format_status(result["instances"])
    if command in ("start", "stop", "restart", "reset"):
        return format_status([result])
    if command == "tail":
        return "\n".join(result["lines"])
    if command == "reload":
        return (
            "\n".join(
                f"{key}: {', '.join(names)}" for key, names in result.items() if names
            )
            or "nothing to change"
        )
    if command == "scale":
        added = ", ".join(result["added"]) or "-"
        removed = ", ".join(result["removed"]) or "-"
        return (
            f"{result['role']}: {result['count']} (added: {added}; removed: {removed})"
        )
    return json.dumps(result)


def format_status(entries: list[dict[str, Any]], now: float | None = None) -> str:
    """Render status entries as an aligned table."""
    now = time.time() if now is None else now
    header = (
        "NAME",
        "ROLE",
        "STATE",
        "PID",
        "ADDRESS",
        "DEVICES",
        "RESTARTS",
        "UPTIME",
        "LAST EXIT",
    )
    rows = [header]
    for e in entries:
        rows.append(
            (
                e["name"],
                e["role"],
                e["state"] if e["state"] != "backoff" else f"backoff ({e['reason']})",
                str(e["pid"] or "-"),
                f"{e['host']}:{e['port']}",
                ",".join(str(d) for d in e["devices"]) or "-",
                str(e["restarts"]),
                _duration(e["uptime"]) if e["uptime"] is not None else "-",
                _last_exit(e["last_exit"], now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _last_exit(last: dict[str, Any] | None, now: float) -> str:
    if not last:
        return "-"
    return f"{last['text']} {_duration(max(0.0, now - last['at']))} ago"


if __name__ == "__main__":
    sys.exit(main())
