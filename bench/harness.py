"""Running the three supervisors side by side, and whole-process timings.

:func:`side_by_side` starts pdsupervisord, circusd and supervisord with the
same N healthchild processes each (on distinct ports), all pinned to one CPU,
and guarantees that everything is stopped afterwards, even on Ctrl-C.
:func:`time_process` times one command the way ``/usr/bin/time`` does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from supervisors import Circus, Ours, Supervised, Supervisord
from topologies import Layout, Probes, Restart, free_ports, tiny_topology

__all__ = [
    "Cpus",
    "ProcessTiming",
    "cpus",
    "raise_on_sigterm",
    "scratch_dir",
    "side_by_side",
    "time_process",
    "tiny_ours",
]


@dataclass(frozen=True)
class Cpus:
    """Which CPU the supervisors get and which the measuring client gets."""

    daemon: int | None
    client: int | None

    def describe(self) -> str:
        """One line for RESULTS.md."""
        if self.daemon is None:
            return "not pinned (one CPU only)"
        return (
            f"each supervisor and its children pinned to CPU {self.daemon} "
            f"(`taskset`), the measuring client to CPU {self.client}"
        )


def cpus() -> Cpus:
    """The first allowed CPU for daemons, the last for the client."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return Cpus(None, None)
    return Cpus(allowed[0], allowed[-1])


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks clean up."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards (kept if BENCH_KEEP is set)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def side_by_side(
    n: int,
    cpu: int | None,
    *,
    workdir: Path,
    variants: dict[str, Probes] | None = None,
) -> Iterator[list[Supervised]]:
    """pdsupervisord, circus and supervisord, each with ``n`` healthchildren.

    ``variants`` adds more pdsupervisord daemons (label → probe settings),
    listed after the three. All are started before any is waited for, so
    their start-ups overlap; they are stopped (and checked gone) on the way
    out.
    """
    variants = variants or {}
    ports = free_ports((3 + len(variants)) * n)
    daemons: list[Supervised] = [
        tiny_ours(workdir / "ours", cpu, ports[:n]),
        Circus(workdir / "circus", cpu, ports[n : 2 * n]),
        Supervisord(workdir / "supervisord", cpu, ports[2 * n : 3 * n]),
    ]
    for i, (label, probes) in enumerate(variants.items(), start=3):
        ours = tiny_ours(
            workdir / f"ours{i}",
            cpu,
            ports[i * n : (i + 1) * n],
            probes=probes,
            label=label,
        )
        daemons.append(ours)
    try:
        for daemon in daemons:
            daemon.start()
        for daemon in daemons:
            daemon.wait_up()
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()


def tiny_ours(
    workdir: Path,
    cpu: int | None,
    ports: list[int],
    *,
    probes: Probes | None = None,
    restart: Restart | None = None,
    label: str | None = None,
) -> Ours:
    """pdsupervisord running one healthchild per port (not started yet)."""
    layout = Layout(workdir, stop_timeout=10.0)
    workdir.mkdir(parents=True)
    topology = workdir / "topology.toml"
    topology.write_text(
        tiny_topology(layout, ports, probes or Probes(), restart or Restart())
    )
    return Ours.on(layout, cpu, topology, label)


@dataclass(frozen=True)
class ProcessTiming:
    """One finished run of a command."""

    wall: float
    cpu: float
    returncode: int


def time_process(argv: list[str]) -> ProcessTiming:
    """Run ``argv`` to completion; its wall time and user+sys CPU time.

    Output is discarded. The CPU figure comes from the kernel's accounting of
    the finished child (``wait4``), as ``/usr/bin/time`` reports it. (Its peak
    RSS is not reported: the forked child counts the parent's pages until it
    execs, which would show this bench's size, not the command's.)
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return ProcessTiming(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        returncode=process.returncode,
    )
