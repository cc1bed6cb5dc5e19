"""Bench 1 — control round trip: ``status`` of N children, three supervisors.

    python bench/control_roundtrip.py [--sizes 8 64] [--rounds 10] [--calls 100]

For each N, pdsupervisord, circusd and supervisord run side by side, each
with the same N ``healthchild.py`` processes, pinned to one CPU; this client
runs on the other. Each supervisor is asked for the status of all its
children through its own client library — ``pdsupervisord.client.Client``
``status``, circus's ``CircusClient`` ``status``, supervisord's XML-RPC
``getAllProcessInfo`` over its unix socket — in rounds that rotate the order,
so drift in machine speed falls on all three alike. Then the whole-process
``pdsupervisorctl status``, ``circusctl status`` and ``supervisorctl status``
are timed the same way, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    cpus,
    raise_on_sigterm,
    scratch_dir,
    side_by_side,
    time_process,
)
from report import (
    Machine,
    command_line,
    fmt_ms,
    load_average,
    markdown_table,
    pin_self,
    ratio,
    summarize,
    verdict,
    write_section,
)
from supervisors import Ours, Supervised
from topologies import PROBES_OFF

PROBES_OFF_LABEL = "pdsupervisord, probes hourly"


def _check_answer(daemon: Supervised, n: int) -> None:
    """Make sure each call really returns N entries (a fair workload)."""
    answer = daemon.status()
    if isinstance(daemon, Ours):
        count = len(answer["instances"])
    elif isinstance(answer, dict):
        count = len(answer["statuses"])
    else:
        count = len(answer)
    if count != n:
        raise RuntimeError(f"{daemon.label} status listed {count} entries, not {n}")


def roundtrips(
    daemons: list[Supervised], rounds: int, calls: int
) -> dict[str, list[float]]:
    """Latency of every call, by supervisor; the order rotates each round."""
    latencies: dict[str, list[float]] = {d.label: [] for d in daemons}
    for daemon in daemons:
        for _ in range(20):  # warm-up: connections, caches
            daemon.status()
    for r in range(rounds):
        order = daemons[r % len(daemons) :] + daemons[: r % len(daemons)]
        for daemon in order:
            batch = latencies[daemon.label]
            for _ in range(calls):
                start = time.perf_counter()
                daemon.status()
                batch.append(time.perf_counter() - start)
    return latencies


def ctl_timings(
    commands: dict[str, list[str]], runs: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) of each run, by command, interleaved."""
    timings: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    names = list(commands)
    for r in range(runs + 1):  # run 0 is a warm-up
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time_process(commands[name])
            if t.returncode != 0:
                raise RuntimeError(f"{name} exited {t.returncode}")
            if r:
                timings[name].append((t.wall, t.cpu))
    return timings


def roundtrip_rows(n: int, latencies: dict[str, list[float]]) -> list[list[str]]:
    """Table rows for one N: p50, p99, calls/s and ratios to the anchors."""
    circus, supervisord = (
        summarize(latencies["circus"]),
        summarize(latencies["supervisord"]),
    )
    rows = []
    for label, values in latencies.items():
        s = summarize(values)
        anchor = label in ("circus", "supervisord")
        ratios = [
            ratio(s.p50, circus.p50),
            ratio(s.p99, circus.p99),
            ratio(s.p50, supervisord.p50),
            ratio(s.p99, supervisord.p99),
        ]
        rows.append(
            [
                str(n),
                label,
                fmt_ms(s.p50, 3),
                fmt_ms(s.p99, 3),
                f"{len(values) / sum(values):.0f}",
            ]
            + (["—"] * 4 if anchor else ratios)
        )
    return rows


def ctl_rows(n: int, timings: dict[str, list[tuple[float, float]]]) -> list[list[str]]:
    """Table rows for one N: wall median and range, CPU, ratios."""
    ours = statistics.median(t[0] for t in timings["pdsupervisorctl -c FILE status"])
    rows = []
    for name, runs in timings.items():
        walls = [t[0] for t in runs]
        wall = statistics.median(walls)
        rows.append(
            [
                str(n),
                f"`{name}`",
                fmt_ms(wall, 1),
                f"{fmt_ms(min(walls), 1)}-{fmt_ms(max(walls), 1)}",
                fmt_ms(statistics.median(t[1] for t in runs), 1),
                ratio(ours, wall),
            ]
        )
    return rows


def targets(
    n: int,
    latencies: dict[str, list[float]],
    timings: dict[str, list[tuple[float, float]]],
) -> list[str]:
    """The issue's two control-plane targets, judged on this run."""
    ours = summarize(latencies["pdsupervisord"]).p99
    circus = summarize(latencies["circus"]).p99
    ctl = statistics.median(t[0] for t in timings["pdsupervisorctl -c FILE status"])
    peer = statistics.median(t[0] for t in timings["supervisorctl status"])
    return [
        verdict(
            f"N = {n}: our `status` p99 at most half of circus's",
            f"{fmt_ms(ours, 2)} ms vs {fmt_ms(circus, 2)} ms",
            ours <= circus / 2,
        ),
        verdict(
            f"N = {n}: `pdsupervisorctl status` no slower than `supervisorctl status`",
            f"median {fmt_ms(ctl, 1)} ms vs {fmt_ms(peer, 1)} ms",
            ctl <= peer,
        ),
    ]


def main() -> None:
    """Run, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=100, help="calls per round")
    parser.add_argument("--ctl-runs", type=int, default=15)
    args = parser.parse_args()
    raise_on_sigterm()
    cpu = cpus()
    pin_self(cpu.client)
    machine, load_before = Machine.probe(), load_average()

    rt_rows: list[list[str]] = []
    ctl_rows_all: list[list[str]] = []
    verdicts: list[str] = []
    for n in args.sizes:
        with (
            scratch_dir("pdsd-bench-rt-") as work,
            side_by_side(
                n, cpu.daemon, workdir=work, variants={PROBES_OFF_LABEL: PROBES_OFF}
            ) as daemons,
        ):
            for daemon in daemons:
                _check_answer(daemon, n)
            latencies = roundtrips(daemons, args.rounds, args.calls)
            ours = daemons[0]
            assert isinstance(ours, Ours)
            commands = {
                "pdsupervisorctl -c FILE status": ours.ctl_argv(),
                "pdsupervisorctl -s ENDPOINT status": ours.ctl_socket_argv(),
                "circusctl status": daemons[1].ctl_argv(),
                "supervisorctl status": daemons[2].ctl_argv(),
            }
            timings = ctl_timings(commands, args.ctl_runs)
        rt_rows += roundtrip_rows(n, latencies)
        ctl_rows_all += ctl_rows(n, timings)
        verdicts += targets(n, latencies, timings)
        print(
            markdown_table(
                ["N", "supervisor", "p50 ms", "p99 ms"], [r[:4] for r in rt_rows]
            )
        )

    body = "\n\n".join(
        [
            machine.markdown(command_line(), load_before, load_average()),
            f"- Pinning: {cpu.describe()}.",
            "- Children: the same `bench/healthchild.py` (a stdlib-only HTTP 200"
            " server started with `python -I -S`) for all three; pdsupervisord"
            " runs them as N/2 prefill + N/2 decode engines without devices or"
            " proxy, probing `/health` with its default periods (start-up 0.5 s,"
            " readiness 5 s, liveness 10 s), so probes run during the"
            " measurement. circus and supervisord use their defaults (one"
            " watcher/program per child).",
            f"- Round trip: {args.rounds} rounds x {args.calls} sequential calls per"
            " supervisor and N, order rotated every round, after 20 warm-up calls;"
            " calls/s = calls ÷ summed latency (one client, one call in flight).",
            markdown_table(
                [
                    "N",
                    "supervisor (call)",
                    "p50 ms",
                    "p99 ms",
                    "calls/s",
                    "p50 ÷ circus",
                    "p99 ÷ circus",
                    "p50 ÷ supervisord",
                    "p99 ÷ supervisord",
                ],
                rt_rows,
            ),
            f'"{PROBES_OFF_LABEL}" is a fourth daemon, run at the same time,'
            " whose readiness and liveness probes run every 3600 s: the control"
            " path without the probe load, to tell the two apart. Calls:"
            ' pdsupervisord: `Client.call("status")`; circus: `CircusClient.call'
            '({"command": "status"})`; supervisord: XML-RPC'
            " `supervisor.getAllProcessInfo()` over its unix socket.",
            f"- Whole process: {args.ctl_runs} runs of each command after one"
            " warm-up, interleaved; wall time from spawn to exit, CPU = user +"
            " sys of the finished process (`wait4`).",
            markdown_table(
                [
                    "N",
                    "command",
                    "wall median ms",
                    "wall min-max ms",
                    "CPU median ms",
                    "pdsupervisorctl -c ÷ this",
                ],
                ctl_rows_all,
            ),
        ]
    )
    body += "\n\n" + "\n".join(verdicts)
    write_section("control_roundtrip", "1. Control round trip", body)


if __name__ == "__main__":
    main()
