"""``pdsupervisorctl``: the command-line client of the control socket.

Exit codes: 0 success, 1 the daemon answered with an error, 2 usage or
topology error, 3 the daemon did not answer in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pdsupervisord import config as config_module
from pdsupervisord.client import Client, CurveKeys, EventStream
from pdsupervisord.errors import ConfigError, ControlError, DaemonUnreachableError

__all__ = ["format_stats", "format_status", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

#: Commands that start a long operation and accept --no-wait/--wait-timeout.
LONG = ("start", "stop", "restart", "reset", "scale", "reload")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdsupervisorctl",
        description="Control a running pdsupervisord.",
        epilog="Exit codes: 0 ok, 1 error reply, 2 usage, 3 daemon unreachable.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help="topology file (to find the sockets)")
    where.add_argument(
        "-s", "--socket", help="control endpoint, e.g. ipc:///run/x.sock"
    )
    parser.add_argument("--events-socket", help="event endpoint (with -s)")
    parser.add_argument("--curve-server-key", help="daemon's public key file (tcp)")
    parser.add_argument("--curve-client-key", help="this client's secret key file")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for an answer"
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON results")
    sub = parser.add_subparsers(dest="command", required=True)

    status = sub.add_parser("status", help="show instances (all, one, or a role)")
    status.add_argument("name", nargs="?", help="an instance name or a role")

    scale = sub.add_parser("scale", help="set the number of instances of a role")
    scale.add_argument("role", choices=("prefill", "decode"))
    scale.add_argument("count", type=int)

    for name, text in (
        ("start", "start an instance (or every instance of a role)"),
        ("stop", "stop an instance (drained from the proxy first)"),
        ("restart", "stop then start an instance"),
        ("reset", "clear fatal/exited and start again"),
    ):
        sub.add_parser(name, help=text).add_argument("name", help="instance or role")

    sub.add_parser("reload", help="re-read the topology file and apply it")
    for name in LONG:
        cmd = sub.choices[name]
        cmd.add_argument(
            "--no-wait", action="store_true", help="return once the command is accepted"
        )
        cmd.add_argument(
            "--wait-timeout",
            type=float,
            default=600.0,
            help="seconds to wait for the outcome (default 600)",
        )

    tail = sub.add_parser("tail", help="last lines of an instance's log")
    tail.add_argument("name")
    tail.add_argument("-n", "--lines", type=int, default=50)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing")

    stats = sub.add_parser("stats", help="CPU and memory of each process tree")
    stats.add_argument("name", nargs="?", help="an instance name or a role")

    wait = sub.add_parser("wait", help="wait until an instance reaches a state")
    wait.add_argument("name")
    wait.add_argument("state")
    wait.add_argument("--timeout", dest="wait_for", type=float, default=60.0)

    events = sub.add_parser("events", help="follow the event stream")
    events.add_argument("name", nargs="?", help="only events of this instance")
    events.add_argument("--count", type=int, help="exit after this many events")

    sub.add_parser("config", help="the effective topology and plan")
    sub.add_parser("shutdown", help="stop everything and exit the daemon")
    sub.add_parser("version", help="daemon and protocol version")
    for cmd in sub.choices.values():
        # `pdsupervisorctl status --json` as well as `pdsupervisorctl --json status`.
        cmd.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
        )
    return parser


def _endpoints(args: argparse.Namespace) -> tuple[str, str | None, CurveKeys | None]:
    """Control endpoint, event endpoint and CurveZMQ keys.

    Raises:
        ConfigError: when the topology file is invalid.
        SystemExit: (usage) when neither -s nor -c (nor the variable) is given.
    """
    curve = None
    if args.curve_server_key and args.curve_client_key:
        curve = CurveKeys.load(args.curve_server_key, args.curve_client_key)
    if args.socket:
        return str(args.socket), args.events_socket, curve
    path = args.config or os.environ.get("PDSUPERVISORD_CONFIG")
    if not path:
        _parser().error("give -c FILE or -s ENDPOINT (or set PDSUPERVISORD_CONFIG)")
    daemon = config_module.load(path).daemon
    return daemon.control, daemon.events, curve


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any], float]:
    """Map parsed arguments to (command, args, reply timeout)."""
    command, timeout = args.command, args.timeout
    body: dict[str, Any] = {}
    if command in ("status", "stats", "start", "stop", "restart", "reset"):
        body = {"name": args.name} if args.name else {}
    elif command == "scale":
        body = {"role": args.role, "count": args.count}
    elif command == "tail":
        body = {"name": args.name, "lines": args.lines}
    elif command == "wait":
        body = {"name": args.name, "state": args.state, "timeout": args.wait_for}
        timeout += args.wait_for
    if command in LONG and not args.no_wait:
        body["wait"] = args.wait_timeout
        timeout += args.wait_timeout
    return command, body, timeout


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        endpoint, events, curve = _endpoints(args)
    except ConfigError as exc:
        print(f"pdsupervisorctl: invalid topology\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"pdsupervisorctl: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        if args.command == "events":
            return _follow_events(events, curve, args)
        command, body, timeout = _request(args)
        _check_socket(endpoint)
        with Client(endpoint, timeout=timeout, curve=curve) as client:
            if timeout > args.timeout:
                # A long wait must not hide a daemon that is not there at all.
                client.call("version", reply_timeout=args.timeout)
            result = client.call(command, **body)
            print(_render(command, result, args.json))
            if command == "tail" and args.follow:
                _follow_tail(client, args.name, result["offset"])
    except DaemonUnreachableError as exc:
        hint = "is pdsupervisord running?"
        print(f"pdsupervisorctl: {exc.message} ({hint})", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"pdsupervisorctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _check_socket(endpoint: str) -> None:
    """Fail at once when an ipc socket file does not exist.

    Raises:
        DaemonUnreachableError: naming the missing file.
    """
    path = endpoint.removeprefix("ipc://")
    if endpoint.startswith("ipc://") and not os.path.exists(path):
        raise DaemonUnreachableError(endpoint, 0.0, f"{path} does not exist")


def _follow_tail(client: Client, name: str, offset: int) -> None:
    """Poll the daemon for new log lines until interrupted."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    while True:
        time.sleep(0.5)
        result = client.call("tail", name=name, offset=offset)
        for line in result["lines"]:
            print(line, flush=True)
        offset = result["offset"]


def _follow_events(
    endpoint: str | None, curve: CurveKeys | None, args: argparse.Namespace
) -> int:
    if endpoint is None:
        _parser().error("events needs -c FILE or --events-socket ENDPOINT")
    topic = f"instance.{args.name}." if args.name else ""
    seen = 0
    with EventStream(endpoint, topic, curve=curve) as stream:
        for event in stream:
            print(json.dumps(event) if args.json else _event_line(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    return EXIT_OK


def _event_line(event: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    skip = {"seq", "time", "topic", "instance", "old", "new", "reason"}
    extra = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    change = f"{event['old']} -> {event['new']}" if event.get("new") else ""
    parts = [stamp, f"#{event.get('seq')}", event.get("topic", ""), change]
    parts += [f"({event['reason']})" if event.get("reason") else "", extra]
    return " ".join(p for p in parts if p)


def _render(command: str, result: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(result, indent=2)
    renderers: dict[str, Callable[[Any], str]] = {
        "status": lambda r: format_status(r["instances"]),
        "start": lambda r: format_status(r["instances"]),
        "stop": lambda r: format_status(r["instances"]),
        "restart": lambda r: format_status(r["instances"]),
        "reset": lambda r: format_status(r["instances"]),
        "wait": lambda r: format_status([r]),
        "stats": lambda r: format_stats(r["instances"]),
        "tail": lambda r: "\n".join(r["lines"]),
        "scale": _render_scale,
        "reload": _render_reload,
        "version": lambda r: f"pdsupervisord {r['version']} (protocol {r['protocol']})",
        "shutdown": lambda r: "shutting down",
    }
    render = renderers.get(command)
    return render(result) if render else json.dumps(result, indent=2)


def _render_scale(result: dict[str, Any]) -> str:
    added = ", ".join(result["added"]) or "-"
    removed = ", ".join(result["removed"]) or "-"
    return f"{result['role']}: {result['count']} (added: {added}; removed: {removed})"


def _render_reload(result: dict[str, Any]) -> str:
    lines = [
        f"{key}: {', '.join(names)}"
        for key, names in result.items()
        if key != "op" and names
    ]
    return "\n".join(lines) or "nothing to change"


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_status(entries: list[dict[str, Any]], now: float | None = None) -> str:
    """Render status entries as an aligned table."""
    now = time.time() if now is None else now
    rows = [
        (
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
    ]
    for e in entries:
        state = e["state"]
        if state in ("backoff", "fatal", "unready", "exited"):
            state = f"{state} ({e['reason']})"
        rows.append(
            (
                e["name"],
                e["role"],
                state,
                str(e["pid"] or "-"),
                f"{e['host']}:{e['port']}",
                ",".join(str(d) for d in e["devices"]) or "-",
                str(e["restarts"]),
                _duration(e["uptime"]) if e["uptime"] is not None else "-",
                _last_exit(e["last_exit"], now),
            )
        )
    return _table(rows)


def format_stats(entries: list[dict[str, Any]]) -> str:
    """Render stats entries as an aligned table."""
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "PROCESSES", "CPU%", "RSS")]
    for e in entries:
        rows.append(
            (
                e["name"],
                e["state"],
                str(e["processes"]),
                f"{e['cpu_percent']:.1f}",
                _bytes(e["rss_bytes"]),
            )
        )
    return _table(rows)


def _bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


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
