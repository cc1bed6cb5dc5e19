"""Bench 5 — topology start: daemon start → proxy answering, minus engine load.

    python bench/topology_start.py [--trials 6] [--load 1.0]

Each trial starts ``pdsupervisord`` on a stand-in topology (1 prefill,
1 decode, the built-in proxy; engine load ``PDSD_ENGINE_LOAD_SECONDS``) and
measures, from the moment the daemon process is spawned, until the first
one-token completion through the proxy is answered 200 (this client tries
every 5 ms from the start). Each engine's own start — from its spawn (the
daemon's ``instance.<name>.starting`` log line) to its ``/health`` answering
(polled every 5 ms) — is measured, and the slowest is subtracted: what is
left is the daemon's start-up, probing, and the proxy's start and membership.
The daemon is shut down after each trial.

Two configurations, trials interleaved: start-up probe every 0.5 s (the
default) and every 0.1 s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpus, raise_on_sigterm, scratch_dir
from report import (
    Machine,
    command_line,
    fmt_ms,
    load_average,
    markdown_table,
    overhead_verdicts,
    pin_self,
    summarize,
    write_section,
)
from supervisors import Ours
from topologies import Layout, Probes, Restart, standin_topology
from traffic import FirstHealthy, RequestLoop, log_events

ENGINES = ("prefill-0", "decode-0")
FIGURES = {
    "to_first_spawn": "daemon spawned → first engine spawned (daemon start-up)",
    "own": "slowest engine's own start (spawn → `/health`), subtracted",
    "probe_lag": "last engine's `/health` → both engines `ready`",
    "to_proxy_spawn": "both `ready` → proxy spawned",
    "proxy_start": "proxy spawned → first completion answered 200",
    "total": "daemon spawned → first completion answered 200",
    "overhead": "**overhead** = total - slowest engine's own start",
}


class Config:
    """One topology file and the figures of its trials."""

    def __init__(self, work: Path, label: str, probes: Probes, load: float) -> None:
        self.label = label
        self.layout = Layout(work / label.replace(" ", "-"), stop_timeout=10.0)
        self.layout.workdir.mkdir(parents=True)
        text, self.ports = standin_topology(
            self.layout,
            load_seconds=load,
            prefill_slots=1,
            probes=probes,
            restart=Restart(),
        )
        self.topology = self.layout.workdir / "topology.toml"
        self.topology.write_text(text)
        self.figures: dict[str, list[float]] = {k: [] for k in FIGURES}


def _daemon_times(log: Path, since: float) -> dict[str, float]:
    """``<instance>.<state>`` → first time at or after ``since``, from the log."""
    times: dict[str, float] = {}
    for at, record in log_events(log):
        event = str(record.get("event", ""))
        if at >= since and event.startswith("instance."):
            key = event.removeprefix("instance.")
            times.setdefault(key, at)
    return times


def trial(config: Config, cpu: int | None, number: int) -> None:
    """Start the daemon, time everything, shut it down."""
    pollers = {name: FirstHealthy(config.ports[name]) for name in ENGINES}
    loop = RequestLoop(config.ports["proxy"], f"ts-{number}", 0.005)
    daemon = Ours.on(config.layout, cpu, config.topology)
    for poller in pollers.values():
        poller.start()
    loop.start()
    try:
        start = time.time()
        daemon.start()
        _wait_answer(loop, daemon, 120)
        daemon.remember_tree()
    finally:
        loop.stop()
        for poller in pollers.values():
            poller.stop()
        daemon.stop()
    _record(config, start, pollers, loop)


def _wait_answer(loop: RequestLoop, daemon: Ours, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while loop.first_ok() is None:
        assert daemon.process is not None
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the proxy; see {daemon.workdir}")
        time.sleep(0.01)


def _record(
    config: Config, start: float, pollers: dict[str, FirstHealthy], loop: RequestLoop
) -> None:
    times = _daemon_times(config.layout.workdir / "daemon.log", start)
    answered = loop.first_ok()
    assert answered is not None
    spawned = {n: times[f"{n}.starting"] for n in ENGINES}
    health: dict[str, float] = {}
    for name in ENGINES:
        at = pollers[name].at
        if at is None:
            raise RuntimeError(f"{name}'s /health never answered")
        health[name] = at
    own = {n: health[n] - spawned[n] for n in ENGINES}
    ready = max(times[f"{n}.ready"] for n in ENGINES)
    f = config.figures
    f["to_first_spawn"].append(min(spawned.values()) - start)
    f["own"].append(max(own.values()))
    f["probe_lag"].append(ready - max(health.values()))
    f["to_proxy_spawn"].append(times["proxy.starting"] - ready)
    f["proxy_start"].append(answered.answered - times["proxy.starting"])
    f["total"].append(answered.answered - start)
    f["overhead"].append(answered.answered - start - max(own.values()))


def main() -> None:
    """Run, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--load", type=float, default=1.0, help="engine load, s")
    args = parser.parse_args()
    raise_on_sigterm()
    cpu = cpus()
    machine = Machine.probe()
    pin_self(cpu.client)
    load_before = load_average()

    with scratch_dir("pdsd-bench-start-") as work:
        configs = [
            Config(work, "startup probe 0.5 s", Probes(), args.load),
            Config(work, "startup probe 0.1 s", Probes(startup_period=0.1), args.load),
        ]
        for t in range(args.trials):
            for config in configs[t % 2 :] + configs[: t % 2]:
                trial(config, cpu.daemon, t)
            print(f"trial {t + 1}/{args.trials}", file=sys.stderr)

    header = ["interval"]
    for config in configs:
        header += [f"{config.label}: p50 ms", "p99 ms"]
    rows = []
    for key, text in FIGURES.items():
        row = [text]
        for config in configs:
            s = summarize(config.figures[key])
            row += [fmt_ms(s.p50, 0), fmt_ms(s.p99, 0)]
        rows.append(row)

    body = "\n\n".join(
        [
            machine.markdown(command_line(), load_before, load_average()),
            f"- Pinning: {cpu.describe()} (engines and proxy are the daemon's"
            " children and share its CPU).",
            f"- Topology: stand-in engines, 1 prefill + 1 decode, built-in proxy;"
            f" `PDSD_ENGINE_LOAD_SECONDS = {args.load}`; `[daemon] stop_timeout ="
            f" 10`; {args.trials} trials per configuration, interleaved, a fresh"
            " daemon each time (shut down after the trial). The client tries a"
            " `max_tokens: 1` completion through the proxy every 5 ms from the"
            " moment it spawns the daemon. Target: overhead under 1 s.",
            markdown_table(header, rows),
            "Rows other than total and overhead are the pieces of the overhead;"
            " p50s of pieces need not add up to the p50 of the sum.",
        ]
    )
    body += "\n\n" + overhead_verdicts(configs, 1.0)
    write_section("topology_start", "5. Topology start", body)


if __name__ == "__main__":
    main()
