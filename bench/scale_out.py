"""Bench 4 — scale-out: ``scale prefill +1`` → first request routed to the new P.

    python bench/scale_out.py [--trials 8] [--load 1.0] [--interval 0.02]

pdsupervisord runs a stand-in topology (1 prefill with a free pool slot,
1 decode, the built-in proxy; engine load ``PDSD_ENGINE_LOAD_SECONDS``).
This client sends one-token completions through the proxy every
``--interval`` seconds and, in each trial, asks for a second prefill
(``scale`` without waiting). The new P is "routed to" when the proxy's log
shows the first of our requests sent to it; that request's answer time is
taken (an upper bound). The engine's own start — from its spawn (the
daemon's ``starting`` event) to its ``/health`` answering (polled every 5 ms
by this client) — is subtracted: what is left is the daemon's and the
proxy's share. The P is then scaled away again (drained, stopped).

Two daemons run side by side, trials interleaved: start-up probe every
0.5 s (the default) and every 0.1 s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
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

from pdsupervisord.client import EventStream

FIGURES = {
    "command_to_spawn": "`scale` sent → new P spawned",
    "own": "engine's own start (spawn → `/health`), subtracted",
    "probe_lag": "`/health` answers → daemon marks it `ready`",
    "ready_to_added": "`ready` → proxy adds the backend (proxy log)",
    "added_to_routed": "added → first request to it answered",
    "total": "`scale` sent → first request routed to the new P",
    "overhead": "**overhead** = total - engine's own start",
}


@dataclass
class Setup:
    """One daemon under test and its figures."""

    label: str
    probes: Probes
    daemon: Ours
    layout: Layout
    ports: dict[str, int]
    events: EventStream
    figures: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in FIGURES}
    )


def make_setup(
    work: Path, cpu: int | None, label: str, probes: Probes, load: float
) -> Setup:
    """Write the topology, start the daemon, wait until all is ready."""
    layout = Layout(work / label.replace(" ", "-"), stop_timeout=10.0)
    layout.workdir.mkdir(parents=True)
    text, ports = standin_topology(
        layout, load_seconds=load, prefill_slots=2, probes=probes, restart=Restart()
    )
    topology = layout.workdir / "topology.toml"
    topology.write_text(text)
    daemon = Ours.on(layout, cpu, topology)
    events = EventStream(layout.events, "instance.prefill-1.")
    daemon.start()
    daemon.wait_up()
    return Setup(label, probes, daemon, layout, ports, events)


def _event_times(events: EventStream, timeout: float) -> tuple[float, float]:
    """(starting, ready) times of prefill-1 from the event stream."""
    spawned = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = events.next(timeout=1)
        if event is None:
            continue
        if event["new"] == "starting":
            spawned = float(event["time"])
        elif event["new"] == "ready" and spawned is not None:
            return spawned, float(event["time"])
    raise RuntimeError(f"prefill-1 not ready within {timeout:.0f} s")


def _first_routed(
    setup: Setup, prefix: str, since: float, timeout: float = 10.0
) -> tuple[float | None, str]:
    """(time the proxy added the new P, id of the first request sent to it)."""
    port = f":{setup.ports['prefill-1']}"
    log = setup.layout.log_dir / "proxy.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        added = None
        for at, record in log_events(log):
            event = record.get("event")
            if (
                at >= since
                and event == "backend.added"
                and port in str(record.get("backend"))
            ):
                added = at if added is None else added
            elif (
                event == "proxy.request"
                and str(record.get("request_id", "")).startswith(prefix + "-")
                and port in str(record.get("prefill"))
            ):
                return added, str(record["request_id"])
        time.sleep(0.05)
    raise RuntimeError(f"no request reached prefill-1 ({port}) in {timeout:.0f} s")


def trial(setup: Setup, number: int, interval: float) -> None:
    """Scale to 2 prefills, time it, scale back to 1."""
    while setup.events.next(timeout=0) is not None:
        pass  # events of earlier trials
    prefix = f"{setup.label.split()[-1]}-t{number}"
    loop = RequestLoop(setup.ports["proxy"], prefix, interval)
    poller = FirstHealthy(setup.ports["prefill-1"])
    loop.start()
    time.sleep(0.2)  # traffic is flowing before the command
    try:
        poller.start()
        start = time.time()
        setup.daemon.client.call("scale", role="prefill", count=2)
        spawned, ready = _event_times(setup.events, 60)
        added, request_id = _first_routed(setup, prefix, start)
    finally:
        loop.stop()
        poller.stop()
    routed = next(s.answered for s in loop.sent if s.request_id == request_id)
    health = poller.at
    assert health is not None
    f = setup.figures
    f["command_to_spawn"].append(spawned - start)
    f["own"].append(health - spawned)
    f["probe_lag"].append(ready - health)
    f["ready_to_added"].append((added - ready) if added else float("nan"))
    f["added_to_routed"].append((routed - added) if added else float("nan"))
    f["total"].append(routed - start)
    f["overhead"].append(routed - start - (health - spawned))
    setup.daemon.remember_tree()
    setup.daemon.client.call("scale", role="prefill", count=1, wait=60)


def main() -> None:
    """Run, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--load", type=float, default=1.0, help="engine load, s")
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    raise_on_sigterm()
    cpu = cpus()
    machine = Machine.probe()
    pin_self(cpu.client)
    load_before = load_average()

    configs = [
        ("startup probe 0.5 s", Probes()),
        ("startup probe 0.1 s", Probes(startup_period=0.1)),
    ]
    setups: list[Setup] = []
    with scratch_dir("pdsd-bench-scale-") as work:
        try:
            for label, probes in configs:
                setups.append(make_setup(work, cpu.daemon, label, probes, args.load))
            for t in range(args.trials):
                for setup in setups[t % 2 :] + setups[: t % 2]:
                    trial(setup, t, args.interval)
                print(f"trial {t + 1}/{args.trials}", file=sys.stderr)
        finally:
            for setup in setups:
                setup.events.close()
                setup.daemon.stop()

    header = ["interval"]
    for setup in setups:
        header += [f"{setup.label}: p50 ms", "p99 ms"]
    rows = []
    for key, text in FIGURES.items():
        row = [text]
        for setup in setups:
            values = [v for v in setup.figures[key] if not math.isnan(v)]
            s = summarize(values)
            row += [fmt_ms(s.p50, 0), fmt_ms(s.p99, 0)]
        rows.append(row)

    body = "\n\n".join(
        [
            machine.markdown(command_line(), load_before, load_average()),
            f"- Pinning: {cpu.describe()} (the engines and the proxy are the"
            " daemon's children, so they share its CPU).",
            f"- Topology: stand-in engines, 1 prefill + 1 pool slot, 1 decode,"
            f" built-in proxy; `PDSD_ENGINE_LOAD_SECONDS = {args.load}`;"
            f" {Restart().describe()} (defaults), `[daemon] stop_timeout = 10`."
            f" {args.trials} trials per configuration, interleaved. Traffic: one"
            f" `max_tokens: 1` completion every {args.interval * 1000:.0f} ms"
            " through the proxy, sequential; the proxy picks the least loaded"
            " prefill, ties round-robin, so the new P gets the next request"
            " once it is a member. Target: overhead under 0.5 s.",
            markdown_table(header, rows),
            "Rows other than total and overhead are the pieces of the overhead;"
            " p50s of pieces need not add up to the p50 of the sum.",
        ]
    )
    body += "\n\n" + overhead_verdicts(setups, 0.5)
    write_section("scale_out", "4. Scale-out", body)


if __name__ == "__main__":
    main()
