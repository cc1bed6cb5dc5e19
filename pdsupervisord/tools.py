"""``pdsupervisord ranktable`` and ``pdsupervisord check``: the Ascend helpers.

::

    pdsupervisord ranktable -c FILE [-o PATH|-]
    pdsupervisord check -c FILE [--json] [--topology-only]

``ranktable`` writes the LLMDataDist rank table for the topology (to every
``DISAGGREGATED_PREFILL_RANK_TABLE_PATH`` the plan exports, or ``-o``),
atomically and only when its content changes, then checks that every
instance will find its own entry. ``check`` runs the topology checks, checks
an existing rank table, and runs the guide's NPU network checks on this
host's devices, printing one row per device and check.

Exit codes: 0 all good (warnings allowed), 1 a check failed or the table
could not be made, 2 usage or an invalid topology file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pdsupervisord import ascend, checks
from pdsupervisord.ascend import DeviceCheck, NpuTools
from pdsupervisord.checks import Finding, HostFacts
from pdsupervisord.config import Topology
from pdsupervisord.errors import AscendError, PlanError

__all__ = ["COMMANDS", "main"]

#: The subcommands ``pdsupervisord`` hands over to this module.
COMMANDS = ("ranktable", "check")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdsupervisord",
        description="Ascend helpers: rank table and pre-flight checks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    table = commands.add_parser(
        "ranktable", help="write the LLMDataDist rank table for the topology"
    )
    table.add_argument("-c", "--config", required=True, help="topology TOML file")
    table.add_argument(
        "-o",
        "--output",
        help="write here ('-': standard output) instead of every "
        "DISAGGREGATED_PREFILL_RANK_TABLE_PATH of the plan",
    )

    check = commands.add_parser(
        "check", help="topology checks and the NPU network pre-flight"
    )
    check.add_argument("-c", "--config", required=True, help="topology TOML file")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument(
        "--topology-only",
        action="store_true",
        help="skip the per-device NPU network checks",
    )
    return parser


def main(
    argv: Sequence[str],
    host: HostFacts | None = None,
    tools: NpuTools | None = None,
) -> int:
    """Run ``ranktable`` or ``check``; returns the exit code.

    Args:
        argv: The arguments, starting with the subcommand.
        host: Facts about this machine (default: read them).
        tools: The NPU tools (default: from the topology's ``[ascend]``).
    """
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed the usage
        return EXIT_OK if exc.code == 0 else EXIT_USAGE

    topo, problems = checks.load(args.config)
    if topo is None:
        _print_findings(problems, sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "ranktable":
            return _ranktable(topo, args.output, host, tools)
        return _check(topo, args.json, args.topology_only, host, tools)
    except PlanError as exc:
        print(f"pdsupervisord {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _print_findings(findings: Sequence[Finding], stream: TextIO) -> None:
    for finding in findings:
        print(finding, file=stream)


# --------------------------------------------------------------------------- #
# ranktable
# --------------------------------------------------------------------------- #


def _ranktable(
    topo: Topology,
    output: str | None,
    host: HostFacts | None,
    tools: NpuTools | None,
) -> int:
    try:
        if output == "-":
            table = ascend.build_ranktable(topo, tools)
            sys.stdout.write(ascend.render_ranktable(table))
        else:
            path = Path(output) if output is not None else None
            table, written = ascend.generate(topo, path, tools)
            for target, changed in written:
                print(f"wrote {target}" if changed else f"{target} is up to date")
    except AscendError as exc:
        print("pdsupervisord ranktable: no rank table written", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILED

    findings = checks.ranktable_findings(topo, table, host or checks.probe_host())
    _print_findings(findings, sys.stderr)
    return EXIT_FAILED if checks.has_errors(findings) else EXIT_OK


# --------------------------------------------------------------------------- #
# check
# --------------------------------------------------------------------------- #


def _check(
    topo: Topology,
    as_json: bool,
    topology_only: bool,
    host: HostFacts | None,
    tools: NpuTools | None,
) -> int:
    host = host or checks.probe_host()
    findings = checks.topology_findings(topo, host)
    findings += checks.existing_ranktable_findings(topo, host)
    rows = [] if topology_only or not _on_npus(topo) else ascend.preflight(topo, tools)
    ok = not checks.has_errors(findings) and all(row.ok for row in rows)

    if as_json:
        document = {
            "ok": ok,
            "findings": [f.to_json() for f in findings],
            "devices": [row.to_json() for row in rows],
        }
        print(json.dumps(document, indent=2))
    else:
        _print_findings(findings, sys.stdout)
        if rows:
            print(render_rows(rows), end="")
        print(_summary(findings, rows))
    return EXIT_OK if ok else EXIT_FAILED


def _on_npus(topo: Topology) -> bool:
    """Whether the engines select Ascend NPUs (so there is an NPU network)."""
    return topo.engine.devices_env == "ASCEND_RT_VISIBLE_DEVICES"


def render_rows(rows: Sequence[DeviceCheck]) -> str:
    """The pre-flight table: one row per device and check, OK or FAIL."""
    header = ("DEVICE", "CHECK", "RESULT", "DETAIL", "FIX")
    body = [
        (
            "-" if row.device is None else str(row.device),
            row.check,
            "OK" if row.ok else "FAIL",
            row.detail,
            row.hint,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]
    lines = []
    for line in [header, *body]:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        lines.append("  ".join([*cells, line[4]]).rstrip())
    return "\n".join(lines) + "\n"


def _summary(findings: Sequence[Finding], rows: Sequence[DeviceCheck]) -> str:
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    failed = sum(not row.ok for row in rows)
    devices = "no device checks run"
    if rows:
        devices = f"{failed} of {len(rows)} device checks failed"
    return (
        f"{devices}; {_count(errors, 'error')}, {_count(warnings, 'warning')} "
        "in the topology"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
