"""Bench 3 — idle cost: daemon CPU and memory with 64 children doing nothing.

    python bench/idle_cost.py [--children 64] [--windows 2] [--seconds 60]

pdsupervisord, circusd and supervisord run side by side, each with the same
``--children`` healthchild processes, all on one CPU. After a settling pause,
each window reads every daemon's CPU time (user + system, from the kernel's
accounting, threads included) at its start and end, and samples its RSS and
USS every 5 s. pdsupervisord probes every child's ``/health`` meanwhile
(readiness every 5 s, liveness every 10 s, the defaults), so the children's
own CPU is reported too: answering probes costs them a little.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpus, raise_on_sigterm, scratch_dir, side_by_side
from report import (
    Machine,
    command_line,
    load_average,
    markdown_table,
    pin_self,
    ratio,
    verdict,
    write_section,
)
from supervisors import Supervised
from topologies import PROBES_OFF

PROBES_OFF_LABEL = "pdsupervisord, probes hourly"

SAMPLE = 5.0
SETTLE = 15.0
MIB = 1024 * 1024


@dataclass
class Usage:
    """One supervisor's figures for one window."""

    cpu_percent: float = 0.0
    children_cpu_percent: float = 0.0
    helpers_cpu_percent: float = 0.0
    rss: list[int] = field(default_factory=list)
    uss: list[int] = field(default_factory=list)
    threads: int = 0


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _split_tree(
    daemon: Supervised,
) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(supervised children, helper processes) of the daemon right now."""
    children: list[psutil.Process] = []
    helpers: list[psutil.Process] = []
    for proc in psutil.Process(daemon.pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        (children if "healthchild.py" in cmdline else helpers).append(proc)
    return children, helpers


def window(daemons: list[Supervised], seconds: float) -> dict[str, Usage]:
    """Measure one window; every daemon's figures over the same interval."""
    procs = {d.label: psutil.Process(d.pid) for d in daemons}
    trees = {d.label: _split_tree(d) for d in daemons}

    def snapshot() -> dict[str, tuple[float, float, float]]:
        taken = {}
        for label, proc in procs.items():
            children, helpers = trees[label]
            taken[label] = (
                _cpu(proc),
                sum(_safe_cpu(p) for p in children),
                sum(_safe_cpu(p) for p in helpers),
            )
        return taken

    usage = {label: Usage() for label in procs}
    start, begin = time.monotonic(), snapshot()
    while time.monotonic() - start < seconds:
        for label, proc in procs.items():
            memory = proc.memory_full_info()
            usage[label].threads = proc.num_threads()
            usage[label].rss.append(memory.rss)
            usage[label].uss.append(memory.uss)
        time.sleep(min(SAMPLE, max(0.0, seconds - (time.monotonic() - start))))
    elapsed, end = time.monotonic() - start, snapshot()
    for label, u in usage.items():
        u.cpu_percent, u.children_cpu_percent, u.helpers_cpu_percent = (
            100 * (e - b) / elapsed
            for b, e in zip(begin[label], end[label], strict=True)
        )
    return usage


def _safe_cpu(proc: psutil.Process) -> float:
    try:
        return _cpu(proc)
    except psutil.Error:
        return 0.0


def rows(results: list[dict[str, Usage]]) -> list[list[str]]:
    """One row per supervisor: CPU per window and median, memory, ratios."""

    def med(label: str, pick: str) -> float:
        if pick in ("rss", "uss"):
            values = [v for w in results for v in getattr(w[label], pick)]
            return float(statistics.median(values)) / MIB
        return float(statistics.median(getattr(w[label], pick) for w in results))

    out = []
    for label in results[0]:
        anchor = label in ("circus", "supervisord")
        cpu, rss = med(label, "cpu_percent"), med(label, "rss")
        ratios = [
            ratio(cpu, med("supervisord", "cpu_percent")),
            ratio(rss, med("supervisord", "rss")),
            ratio(cpu, med("circus", "cpu_percent")),
            ratio(rss, med("circus", "rss")),
        ]
        out.append(
            [
                label,
                ", ".join(f"{w[label].cpu_percent:.3f}" for w in results),
                f"{cpu:.3f}",
                f"{med(label, 'helpers_cpu_percent'):.3f}",
                f"{rss:.1f}",
                f"{med(label, 'uss'):.1f}",
                str(results[0][label].threads),
                f"{med(label, 'children_cpu_percent'):.3f}",
            ]
            + (["—"] * 4 if anchor else ratios)
        )
    return out


def targets(results: list[dict[str, Usage]]) -> list[str]:
    """The issue's idle target: CPU and RSS no worse than supervisord's."""

    def cpu(label: str) -> float:
        return float(statistics.median(w[label].cpu_percent for w in results))

    def rss(label: str) -> float:
        return float(statistics.median(v for w in results for v in w[label].rss))

    ours, peer = "pdsupervisord", "supervisord"
    return [
        verdict(
            "idle CPU no worse than supervisord's (probes running)",
            f"{cpu(ours):.3f} % vs {cpu(peer):.3f} % of a core",
            cpu(ours) <= cpu(peer),
        ),
        verdict(
            "idle RSS no worse than supervisord's",
            f"{rss(ours) / MIB:.1f} MiB vs {rss(peer) / MIB:.1f} MiB",
            rss(ours) <= rss(peer),
        ),
    ]


def main() -> None:
    """Run, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=64)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    raise_on_sigterm()
    cpu = cpus()
    machine = Machine.probe()
    pin_self(cpu.client)
    load_before = load_average()

    results = []
    with (
        scratch_dir("pdsd-bench-idle-") as work,
        side_by_side(
            args.children,
            cpu.daemon,
            workdir=work,
            variants={PROBES_OFF_LABEL: PROBES_OFF},
        ) as daemons,
    ):
        time.sleep(SETTLE)
        for w in range(args.windows):
            results.append(window(daemons, args.seconds))
            print(f"window {w + 1}/{args.windows} done", file=sys.stderr)
            for daemon in daemons:
                daemon.remember_tree()

    table = rows(results)
    body = "\n\n".join(
        [
            machine.markdown(command_line(), load_before, load_average()),
            f"- Pinning: {cpu.describe()}.",
            f"- {args.children} `bench/healthchild.py` children per supervisor, all"
            f" three running at once; {SETTLE:.0f} s settling after every child is"
            f" up, then {args.windows} windows of {args.seconds:.0f} s. CPU % is of"
            " one core: the daemon process's own user + system time (all its"
            " threads) over the window; RSS and USS are the medians of samples"
            f' every {SAMPLE:.0f} s. "Helpers" are processes the daemon runs'
            " besides the children (circus's `circusd-stats` when enabled; none"
            " here with defaults). pdsupervisord probes every child: readiness"
            " every 5 s and liveness every 10 s (its defaults), i.e."
            f" {args.children * (1 / 5 + 1 / 10):.1f} HTTP probes/s; circus and"
            " supervisord only wait for SIGCHLD and poll on their timers."
            f' "{PROBES_OFF_LABEL}" is a fourth daemon with readiness and'
            " liveness probes every 3600 s, run at the same time: the daemon's"
            " cost without the probes. CPU time is counted in 10 ms clock ticks"
            " (±0.02 % of a core over 60 s). Side by side inflates one of our"
            " costs: pdsupervisord re-reads each instance's descendants every"
            " 10 s with psutil, which scans every process on the host, and the"
            f" host here also holds the other supervisors' {3 * args.children}"
            " children.",
            markdown_table(
                [
                    "supervisor",
                    "CPU % per window",
                    "CPU % median",
                    "helpers CPU %",
                    "RSS MiB",
                    "USS MiB",
                    "threads",
                    "children CPU % (sum)",
                    "CPU ÷ supervisord",
                    "RSS ÷ supervisord",
                    "CPU ÷ circus",
                    "RSS ÷ circus",
                ],
                table,
            ),
        ]
    )
    body += "\n\n" + "\n".join(targets(results))
    write_section("idle_cost", "3. Idle cost", body)


if __name__ == "__main__":
    main()
