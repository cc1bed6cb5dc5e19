"""Bench 2 — repair speed: SIGKILL a child, time until a new one is spawned.

    python bench/repair_speed.py [--trials 20] [--children 8] [--load 1.0]

Part A, side by side: pdsupervisord (twice: ``backoff_initial = 0`` and the
default 1 s), circusd and supervisord each run the same ``--children``
healthchild processes on one CPU. Each trial SIGKILLs one child of one
supervisor and polls the supervisor's direct children in /proc (every
0.5 ms, from the other CPU) until a new pid appears: the same neutral
"spawned" instant for all, independent of any supervisor's own reporting.
For pdsupervisord the ``instance.<name>.starting`` event on its event socket
is recorded too. Trials rotate over the supervisors; the next trial on a
supervisor waits until it is back up (for supervisord: ``RUNNING``, which
takes ``startsecs`` = 1 s; killing earlier would count as a failed start).

Part B, pdsupervisord only: a stand-in vLLM engine (1 prefill + 1 decode,
``PDSD_ENGINE_LOAD_SECONDS``) whose API server is SIGKILLed, leaving its
EngineCore and worker behind, as vLLM does. Measured: kill → new leader
spawned (the daemon first kills the orphans), kill → its ``/health``
answering (polled every 5 ms by this client), kill → ``ready`` (the daemon's
start-up probe passed and the instance is back in rotation). The engine's
own start time (spawn → ``/health``) is subtracted to give the daemon's part.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpus, raise_on_sigterm, scratch_dir, tiny_ours
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
from supervisors import (
    Circus,
    Ours,
    Supervised,
    Supervisord,
    direct_children,
    wait_until,
)
from topologies import Layout, Probes, Restart, free_ports, standin_topology

from pdsupervisord.client import EventStream

POLL = 0.0005
#: The anchors' own polling periods (circus ``check_delay``, supervisord's
#: select timeout); pdsupervisord reacts to the exit itself.
TIMERS = {"circus": 5.0, "supervisord": 1.0}
#: Seeded, so that a rerun draws the same kill phases.
PHASE = random.Random(8)


def wait_new_child(pid: int, before: set[int], timeout: float = 30.0) -> float:
    """perf_counter() time at which a child of ``pid`` not in ``before`` appears."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if direct_children(pid) - before:
            return time.perf_counter()
        time.sleep(POLL)
    raise RuntimeError(f"no new child of {pid} within {timeout:.0f} s")


def drain(events: EventStream) -> None:
    """Drop the events already queued (earlier starts), so the next is new."""
    while events.next(timeout=0) is not None:
        pass


class Trial:
    """One supervisor's respawn trials, with its own 'back up' condition."""

    def __init__(self, label: str, daemon: Supervised, timer: float) -> None:
        self.label = label
        self.daemon = daemon
        self.timer = timer
        self.respawn: list[float] = []
        self.event: list[float] = []
        self.noticed: list[float] = []
        self.events: EventStream | None = None
        if isinstance(daemon, Ours):
            self.events = EventStream(daemon.events, "instance.")

    def run_once(self) -> None:
        """Kill one child, time the respawn, wait until fully back up.

        The kill comes after a random pause of up to the supervisor's own
        polling period (``timer``), so that it lands at a random phase of
        that timer rather than at one fixed by the trial cadence.
        """
        daemon = self.daemon
        time.sleep(PHASE.uniform(0.0, self.timer))
        before = daemon.children()
        victim = min(before)
        if self.events is not None:
            drain(self.events)
        wall = time.time()
        start = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        self.respawn.append(wait_new_child(daemon.pid, before) - start)
        if self.events is not None:
            noticed, starting = self._event_times()
            self.noticed.append(noticed - wall)
            self.event.append(starting - wall)
        wait_until(_up(daemon), 60, f"{self.label} to be back up")
        daemon.remember_tree()

    def _event_times(self) -> tuple[float, float]:
        """Times of the ``backoff`` event (exit seen, tree reaped) and the
        ``starting`` event (checked and spawned again)."""
        assert self.events is not None
        noticed = None
        while True:
            event = self.events.next(timeout=30)
            if event is None:
                raise RuntimeError("no 'starting' event within 30 s")
            if event["new"] == "backoff":
                noticed = float(event["time"])
            elif event["new"] == "starting" and noticed is not None:
                return noticed, float(event["time"])

    def close(self) -> None:
        """Close the event socket."""
        if self.events is not None:
            self.events.close()


def _up(daemon: Supervised) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return daemon.all_up()
        except Exception:
            return False

    return check


def part_a(work: Path, cpu: int | None, children: int, trials: int) -> list[Trial]:
    """Respawn trials on four supervisors side by side."""
    ports = free_ports(4 * children)

    def ours(name: str, backoff: float, span: slice) -> Ours:
        restart = Restart(backoff_initial=backoff, stable_after=0.0, max_restarts=1000)
        return tiny_ours(work / name, cpu, ports[span], restart=restart)

    n = children
    daemons: list[tuple[str, Supervised]] = [
        ("pdsupervisord, backoff_initial = 0", ours("ours0", 0.0, slice(0, n))),
        (
            "pdsupervisord, backoff_initial = 1 (default)",
            ours("ours1", 1.0, slice(n, 2 * n)),
        ),
        ("circus", Circus(work / "circus", cpu, ports[2 * n : 3 * n])),
        ("supervisord", Supervisord(work / "supervisord", cpu, ports[3 * n :])),
    ]
    runs: list[Trial] = []
    try:
        for _, daemon in daemons:
            daemon.start()
        for label, daemon in daemons:
            daemon.wait_up()
            runs.append(Trial(label, daemon, TIMERS.get(daemon.label, 0.0)))
        for t in range(trials):
            order = runs[t % len(runs) :] + runs[: t % len(runs)]
            for run in order:
                run.run_once()
            print(f"part A trial {t + 1}/{trials}", file=sys.stderr)
        return runs
    finally:
        for run in runs:
            run.close()
        for _, daemon in daemons:
            daemon.stop()


def _health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def part_b(
    work: Path, cpu: int | None, trials: int, load: float
) -> dict[str, list[float]]:
    """Kill a stand-in engine's API server; time spawn, health and ready."""
    layout = Layout(work / "standin", stop_timeout=10.0)
    layout.workdir.mkdir(parents=True)
    text, ports = standin_topology(
        layout,
        load_seconds=load,
        prefill_slots=1,
        probes=Probes(),
        restart=Restart(backoff_initial=0.0, stable_after=0.0, max_restarts=1000),
        proxy=False,
    )
    topology = layout.workdir / "topology.toml"
    topology.write_text(text)
    daemon = Ours.on(layout, cpu, topology)
    figures: dict[str, list[float]] = {
        k: [] for k in ("spawn", "health", "ready", "own", "overhead")
    }
    events = EventStream(layout.events, "instance.prefill-0.")
    try:
        daemon.start()
        daemon.wait_up()
        for t in range(trials):
            _one_engine_kill(daemon, events, ports["prefill-0"], figures)
            print(f"part B trial {t + 1}/{trials}", file=sys.stderr)
        return figures
    finally:
        events.close()
        daemon.stop()


def _one_engine_kill(
    daemon: Ours, events: EventStream, port: int, figures: dict[str, list[float]]
) -> None:
    victim = next(
        i["pid"] for i in daemon.status()["instances"] if i["name"] == "prefill-0"
    )
    daemon.remember_tree()
    drain(events)
    start = time.time()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not _health_ok(port), 10, "the killed engine's port to close")
    while not _health_ok(port):
        time.sleep(0.005)
    health = time.time()
    spawned = ready = None
    while ready is None:
        event = events.next(timeout=60)
        if event is None:
            raise RuntimeError("prefill-0 did not become ready within 60 s")
        if event["new"] == "starting":
            spawned = float(event["time"])
        elif event["new"] == "ready":
            ready = float(event["time"])
    assert spawned is not None
    own = health - spawned
    figures["spawn"].append(spawned - start)
    figures["health"].append(health - start)
    figures["ready"].append(ready - start)
    figures["own"].append(own)
    figures["overhead"].append(ready - start - own)
    daemon.remember_tree()


def main() -> None:
    """Run both parts, print and write the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--load", type=float, default=1.0, help="engine load, s")
    args = parser.parse_args()
    raise_on_sigterm()
    cpu = cpus()
    machine = Machine.probe()
    pin_self(cpu.client)
    load_before = load_average()

    with scratch_dir("pdsd-bench-repair-") as work:
        runs = part_a(work, cpu.daemon, args.children, args.trials)
        engine = part_b(work, cpu.daemon, args.trials, args.load)

    supervisord = summarize(runs[-1].respawn)
    circus = summarize(runs[-2].respawn)
    rows = []
    for run in runs:
        s = summarize(run.respawn)
        ev = summarize(run.event) if run.event else None
        seen = summarize(run.noticed) if run.noticed else None
        rows.append(
            [
                run.label,
                str(s.n),
                fmt_ms(s.p50, 1),
                fmt_ms(s.p99, 1),
                f"{fmt_ms(s.low, 1)}-{fmt_ms(s.high, 1)}",
                fmt_ms(seen.p50, 1) if seen else "—",
                fmt_ms(ev.p50, 1) if ev else "—",
                ratio(s.p50, circus.p50),
                ratio(s.p50, supervisord.p50),
            ]
        )
    b_rows = []
    names = {
        "spawn": "kill → new API server spawned (orphans killed first)",
        "health": "kill → its `/health` answers (client polls every 5 ms)",
        "ready": "kill → `ready` event (start-up probe passed, back in rotation)",
        "own": "engine's own start: spawn → `/health` answers",
        "overhead": "daemon's part: kill → ready minus the engine's own start",
    }
    for key, text in names.items():
        s = summarize(engine[key])
        b_rows.append(
            [
                text,
                fmt_ms(s.p50, 1),
                fmt_ms(s.p99, 1),
                f"{fmt_ms(s.low, 1)}-{fmt_ms(s.high, 1)}",
            ]
        )

    body = "\n\n".join(
        [
            machine.markdown(command_line(), load_before, load_average()),
            f"- Pinning: {cpu.describe()}.",
            f"- Part A: {args.children} `bench/healthchild.py` children per"
            f' supervisor, {args.trials} trials each, interleaved. "Spawned" = a'
            " new pid among the supervisor's direct children in /proc, polled every"
            " 0.5 ms from the client CPU (the same instant for all four). Each kill"
            " on circus and supervisord comes after a random pause of up to their"
            " polling period (5 s, 1 s), so it lands at a random phase of their"
            " timer. Our"
            " settings: " + Restart(0.0, 0.0, 1000).describe() + " or"
            " `backoff_initial = 1` (the default); `stable_after = 0` makes each"
            " kill of a ready instance a fresh failure streak, as circus and"
            " supervisord treat a process that was running, and `max_restarts`"
            " keeps trials from reaching `fatal`. " + Probes().describe() + " (the"
            " defaults). circus and supervisord: defaults (circus `check_delay`"
            " 5 s, supervisord `autorestart = true`, `startsecs = 1`).",
            markdown_table(
                [
                    "supervisor",
                    "trials",
                    "p50 ms",
                    "p99 ms",
                    "min-max ms",
                    "`backoff` event p50 ms",
                    "`starting` event p50 ms",
                    "÷ circus p50",
                    "÷ supervisord p50",
                ],
                rows,
            ),
            "The event columns (pdsupervisord only) are the daemon's own event"
            " timestamps minus the kill time (same clock): `backoff` is emitted"
            " once the exit was seen and the process group verified empty,"
            " `starting` once the pre-start checks passed and the new process"
            " was spawned.",
            f"- Part B: stand-in engine (1 prefill + 1 decode, no proxy),"
            f" `PDSD_ENGINE_LOAD_SECONDS = {args.load}`, the prefill's API server"
            f" SIGKILLed {args.trials} times; `backoff_initial = 0`, probes at their"
            " defaults (start-up probe every 0.5 s). circus and supervisord are"
            ' not run here: they have no health notion to be "ready" by, and'
            " they restart only the killed process, leaving the stand-in's"
            " EngineCore (which holds the device lock and KV port) running.",
            markdown_table(["interval", "p50 ms", "p99 ms", "min-max ms"], b_rows),
        ]
    )
    fast, default = summarize(runs[0].respawn), summarize(runs[1].respawn)
    body += "\n\n" + "\n".join(
        [
            verdict(
                "respawn p50 under 50 ms (`backoff_initial = 0`)",
                f"{fmt_ms(fast.p50, 1)} ms",
                fast.p50 < 0.05,
            ),
            verdict(
                "respawn p50 under 50 ms (default `backoff_initial = 1`)",
                f"{fmt_ms(default.p50, 1)} ms",
                default.p50 < 0.05,
            ),
        ]
    )
    write_section("repair_speed", "2. Repair speed", body)


if __name__ == "__main__":
    main()
