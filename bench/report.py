"""Figures and reporting shared by the benchmarks: machine facts, percentiles,
and writing one bench's section into ``bench/RESULTS.md``.

Each bench owns one section of RESULTS.md between two HTML comment markers
(``<!-- bench:NAME begin -->`` / ``end``); writing a section re-reads the file
and replaces only that block, so sections written by other benches (and by
other people, such as the proxy benchmarks) are kept as they are.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS",
    "Machine",
    "Summary",
    "fmt_ms",
    "load_average",
    "markdown_table",
    "percentile",
    "pin_self",
    "ratio",
    "summarize",
    "verdict",
    "write_section",
]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

_HEADER = """# Benchmark results

Each section is written by one benchmark run (the command is in the section) and
replaced as a whole when that benchmark runs again. Benchmarks are not tests: nothing
here is asserted, and figures from a shared, noisy machine are compared only with
figures taken side by side in the same run.
"""


@dataclass(frozen=True)
class Machine:
    """What a reader needs to judge a figure: the machine, the software, when."""

    cpus: int
    cpu_model: str
    memory_gib: float
    date: str
    python: str
    versions: dict[str, str]

    @classmethod
    def probe(cls) -> Machine:
        """Read this machine's facts (``nproc``, /proc/cpuinfo, /proc/meminfo)."""
        return cls(
            cpus=os.cpu_count() or 0,
            cpu_model=_cpu_model(),
            memory_gib=_memory_gib(),
            date=subprocess.run(
                ["date"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            python=platform.python_version(),
            versions={
                name: _version(name)
                for name in ("pdsupervisord", "circus", "supervisor")
            },
        )

    def markdown(self, command: str, load_before: str, load_after: str) -> str:
        """The bullet list that heads each section."""
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return "\n".join(
            [
                f"- Command: `{command}`",
                f"- Date: {self.date}",
                f"- Machine: {self.cpus} CPUs (`nproc`), {self.cpu_model}, "
                f"{self.memory_gib:.1f} GiB memory",
                f"- Software: Python {self.python}, {versions}",
                f"- Load average before / after: {load_before} / {load_after}"
                + _noise_note(load_before, load_after),
            ]
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return math.nan


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def _noise_note(before: str, after: str) -> str:
    """Say plainly when other work was running (load above 0.5 on 2 CPUs)."""
    worst = max(
        float(before.split(",", maxsplit=1)[0]), float(after.split(",", maxsplit=1)[0])
    )
    if worst > 0.5:
        return (
            " — the machine was **not quiet** (other engineers' tests and"
            " servers were running): read ratios, not absolute times"
        )
    return " (quiet)"


def command_line() -> str:
    """The command that ran this bench, as a user would type it."""
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parent.parent)
    return shlex.join(["python", script, *sys.argv[1:]])


def pin_self(cpu: int | None) -> None:
    """Pin this (client) process to ``cpu``; None leaves it unpinned."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# ------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Summary:
    """Distribution of one measured quantity, in seconds."""

    n: int
    p50: float
    p99: float
    mean: float
    low: float
    high: float


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    below, above = math.floor(rank), math.ceil(rank)
    share = rank - below
    return ordered[below] * (1 - share) + ordered[above] * share


def summarize(values: Sequence[float]) -> Summary:
    """p50, p99, mean, min and max of ``values`` (NaN for an empty list)."""
    if not values:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Summary(
        n=len(values),
        p50=percentile(values, 50),
        p99=percentile(values, 99),
        mean=statistics.fmean(values),
        low=min(values),
        high=max(values),
    )


def fmt_ms(seconds: float, digits: int = 2) -> str:
    """Seconds as milliseconds for a table cell."""
    return "—" if math.isnan(seconds) else f"{seconds * 1000:.{digits}f}"


def ratio(ours: float, anchor: float) -> str:
    """``ours / anchor`` for a table cell, e.g. ``0.42x``."""
    if math.isnan(ours) or math.isnan(anchor) or anchor == 0:
        return "—"
    return f"{ours / anchor:.2f}x"


def verdict(target: str, ours: str, ok: bool) -> str:
    """One bullet for a target of the issue: what it is, what we got, met or not."""
    mark = "**met**" if ok else "**missed**"
    return f"- Target: {target} — {ours}: {mark}"


def overhead_verdicts(runs: Sequence[Any], limit: float) -> str:
    """One target bullet per configuration: p50 of its ``overhead`` figures
    (seconds) under ``limit``. ``runs`` have ``label`` and ``figures``."""
    lines = []
    for run in runs:
        p50 = summarize(run.figures["overhead"]).p50
        lines.append(
            verdict(
                f"overhead p50 under {limit:.1f} s ({run.label})",
                f"{fmt_ms(p50, 0)} ms",
                p50 < limit,
            )
        )
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ results


def write_section(name: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) this bench's section of RESULTS.md.

    The file is re-read right before writing and only the block between this
    bench's markers changes; the window in which a concurrent writer could be
    overwritten is that of one read and one write.
    """
    begin, end = f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"
    block = f"{begin}\n## {title}\n\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else _HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    print(f"wrote section {name!r} of {path}")
