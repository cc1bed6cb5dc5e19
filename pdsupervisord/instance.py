"""The supervision state machine of one instance, run as an actor task.

Design note: every change to an instance's state happens in one task, the
actor loop in :meth:`Instance.run`, which handles one message at a time from
its inbox. Process exits, probe results, backoff timers and operator commands
all arrive as messages, so a crash racing a ``stop`` command, or a probe
finishing after the process died, cannot interleave half-way through a
transition. Each spawn has a generation number; messages from an older
generation are ignored. Slow work (draining, killing, pre-start checks) runs
in helper tasks or threads that report back through the inbox, so the actor
stays responsive and ``status`` always answers at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pdsupervisord import policy
from pdsupervisord.child import Child, spawn
from pdsupervisord.config import ProbeConfig, RestartConfig
from pdsupervisord.events import EventBus
from pdsupervisord.logfiles import RotatingLog, pump, tail
from pdsupervisord.plan import InstanceSpec
from pdsupervisord.preflight import Problem
from pdsupervisord.states import RUNNING_STATES, ExitStatus, State, check_transition

__all__ = ["Hooks", "Instance", "Settings"]

log = structlog.get_logger("pdsupervisord.instance")

#: When to look for new descendants after a spawn (then the supervisor's one
#: shared scan takes over). vLLM starts EngineCore within a second or two of
#: the API server; the snapshots feed the state file used to clean up after a
#: daemon crash.
TRACK_FIRST = (0.3, 1.5, 4.0)


class Hooks(Protocol):
    """What an instance asks of the supervisor that owns it."""

    async def probe(self, instance: Instance, kind: str) -> bool:
        """One probe (``startup``, ``readiness``, ``liveness``); True if healthy."""
        ...

    async def preflight(self, instance: Instance) -> list[Problem]:
        """Pre-start checks; an empty list means the instance may start."""
        ...

    async def on_ready(self, instance: Instance) -> None:
        """The instance became ready (e.g. add it to the proxy)."""
        ...

    async def on_down(self, instance: Instance, drain: bool) -> None:
        """The instance is leaving service; with ``drain``, wait for in-flight."""
        ...

    def on_tree(self, instance: Instance, child: Child | None) -> None:
        """The process tree changed (spawned, grew) or is gone (None)."""
        ...


@dataclass(frozen=True)
class Settings:
    """Per-instance knobs taken from the topology."""

    restart: RestartConfig
    probes: ProbeConfig
    stop_timeout: float


# Messages -------------------------------------------------------------------


@dataclass
class _Start:
    reason: str = "commanded"
    handled: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Stop:
    drain: bool = True
    restart: bool = False
    reason: str = "commanded"
    new_spec: InstanceSpec | None = None
    handled: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Exited:
    gen: int
    status: ExitStatus


@dataclass
class _Ready:
    gen: int


@dataclass
class _Unready:
    gen: int


@dataclass
class _Kill:
    """The start-up deadline or the liveness probe says: kill it."""

    gen: int
    cause: str


@dataclass
class _BackoffOver:
    gen: int


@dataclass
class _Stopped:
    gen: int
    orphans: list[int]


_Msg = _Start | _Stop | _Exited | _Ready | _Unready | _Kill | _BackoffOver | _Stopped


@dataclass
class _Run:
    """Book-keeping of the current spawn."""

    gen: int
    child: Child | None = None
    scopes: list[anyio.CancelScope] = field(default_factory=list)
    ready_at: float | None = None
    cause: str = "crashed"
    commanded: bool = False
    restart_after: bool = False
    status: ExitStatus = field(default_factory=ExitStatus)
    log_tail: list[str] = field(default_factory=list)

    def scope(self) -> anyio.CancelScope:
        """A new scope for one of this run's helper tasks."""
        scope = anyio.CancelScope()
        self.scopes.append(scope)
        return scope

    def cancel(self) -> None:
        """Cancel every helper task of this run (probes, timers, trackers)."""
        for scope in self.scopes:
            scope.cancel()
        self.scopes.clear()


class Instance:
    """One supervised process: check, spawn, probe, watch, restart, stop.

    Public methods send messages to the actor and return at once; use
    :meth:`wait_for` to block until a state is reached.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        hooks: Hooks,
        *,
        settings: Settings,
        bus: EventBus,
        log_file: RotatingLog,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.log_file = log_file
        self._hooks = hooks
        self._settings = settings
        self._bus = bus
        self._env_extra = env_extra or {}

        self.state = State.STOPPED
        self.reason = "created"
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.removed = False
        self._failures = 0
        self._restart_times: list[float] = []
        self._run: _Run | None = None
        self._gen = 0
        self._changed = anyio.Event()
        self._finished = False
        self._send: MemoryObjectSendStream[_Msg]
        self._recv: MemoryObjectReceiveStream[_Msg]
        self._send, self._recv = anyio.create_memory_object_stream[_Msg](math.inf)
        self._tg: anyio.abc.TaskGroup | None = None

    # ----------------------------------------------------------------- facts

    @property
    def name(self) -> str:
        """The instance name, e.g. ``prefill-0``."""
        return self.spec.name

    @property
    def child(self) -> Child | None:
        """The current process tree while one exists."""
        run = self._run
        if run and run.child and self.state in RUNNING_STATES:
            return run.child
        return None

    @property
    def pid(self) -> int | None:
        """The leader's pid while a process exists."""
        child = self.child
        return child.pid if child else None

    def uptime(self) -> float | None:
        """Seconds since the current process became ready, or None."""
        run = self._run
        serving = self.state in (State.READY, State.UNREADY)
        if run and run.ready_at is not None and serving:
            return time.monotonic() - run.ready_at
        return None

    def status(self) -> dict[str, Any]:
        """The ``status`` command's entry for this instance."""
        return {
            "name": self.name,
            "role": self.spec.role,
            "state": self.state.value,
            "reason": self.reason,
            "pid": self.pid,
            "host": self.spec.host,
            "port": self.spec.port,
            "devices": list(self.spec.devices),
            "restarts": self.restarts,
            "uptime": self.uptime(),
            "last_exit": self.last_exit,
        }

    # -------------------------------------------------------------- commands

    def start(self) -> anyio.Event:
        """Ask the actor to start; also clears ``fatal`` and ``exited``.

        Returns:
            An event set once the actor has acted on the request, so a caller
            that then waits for a state sees the state after the command.
        """
        return self._post(_Start())

    def stop(self, drain: bool = True, reason: str = "commanded") -> anyio.Event:
        """Ask the actor to stop; with ``drain`` the proxy drains it first."""
        return self._post(_Stop(drain=drain, reason=reason))

    def restart(self, new_spec: InstanceSpec | None = None) -> anyio.Event:
        """Ask the actor to stop (draining) and start again, maybe with a new plan."""
        reason = "reloaded" if new_spec else "commanded"
        return self._post(_Stop(restart=True, reason=reason, new_spec=new_spec))

    def finish(self) -> None:
        """Stop without draining (shutdown) and end the actor loop."""
        self._finished = True
        self._post(_Stop(drain=False, reason="shutdown"))

    def retire(self, reason: str = "scaled_down") -> anyio.Event:
        """Drain, stop and end the actor loop for good (scale-down, reload)."""
        self.removed = True
        self._finished = True
        return self._post(_Stop(drain=True, reason=reason))

    def _post(self, message: _Start | _Stop) -> anyio.Event:
        self._send.send_nowait(message)
        return message.handled

    async def wait_for(
        self, predicate: Callable[[State], bool], timeout: float
    ) -> bool:
        """Block until ``predicate(state)`` holds; False on timeout."""
        with anyio.move_on_after(timeout):
            while not predicate(self.state):
                await self._changed.wait()
            return True
        return False

    # ------------------------------------------------------------ actor loop

    async def run(self) -> None:
        """The actor loop; returns after :meth:`finish` once stopped."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            async for message in self._recv:
                await self._handle(message)
                if self._finished and self.state is State.STOPPED:
                    break
            tg.cancel_scope.cancel()

    async def _handle(self, message: _Msg) -> None:
        if isinstance(message, _Start | _Stop):
            await self._on_command(message)
            message.handled.set()
            return
        run = self._run
        if run is None or message.gen != run.gen:
            log.debug("instance.stale_message", instance=self.name, message=message)
        elif isinstance(message, _Ready):
            await self._on_ready(run)
        elif isinstance(message, _Unready):
            await self._on_unready(run)
        elif isinstance(message, _Kill):
            self._on_kill(run, message.cause)
        elif isinstance(message, _Exited):
            self._on_exited(run, message.status)
        elif isinstance(message, _Stopped):
            await self._on_stopped(run, message.orphans)
        elif isinstance(message, _BackoffOver) and self.state is State.BACKOFF:
            await self._launch("backoff_over")

    def _transition(self, new: State, reason: str, **detail: Any) -> None:
        old = self.state
        check_transition(old, new)
        self.state, self.reason = new, reason
        self._changed.set()
        self._changed = anyio.Event()
        self._bus.emit(
            f"instance.{self.name}.{new.value}",
            instance=self.name,
            old=old.value,
            new=new.value,
            reason=reason,
            **detail,
        )

    # ------------------------------------------------------------- handlers

    async def _on_command(self, message: _Start | _Stop) -> None:
        if isinstance(message, _Start):
            await self._on_start(message)
        else:
            await self._on_stop(message)

    async def _on_start(self, message: _Start) -> None:
        if self.state in (State.STOPPED, State.EXITED, State.FATAL):
            self._failures = 0
            self._restart_times.clear()
            await self._launch(message.reason)
        elif self.state is State.BACKOFF and self._run:
            self._run.cancel()
            await self._launch(message.reason)

    async def _on_stop(self, message: _Stop) -> None:
        if message.new_spec is not None:
            self.spec = message.new_spec
        run = self._run
        if self.state in (State.STARTING, State.READY, State.UNREADY) and run:
            assert run.child is not None
            run.commanded = True
            run.restart_after = message.restart
            self._transition(State.STOPPING, message.reason, pid=run.child.pid)
            self._background(self._stop_child(run, drain=message.drain))
        elif self.state is State.STOPPING and run:
            run.restart_after = run.restart_after or message.restart
        elif self.state in (State.BACKOFF, State.EXITED, State.FATAL):
            if run:
                run.cancel()
            self._transition(State.STOPPED, message.reason)
            if message.restart:
                await self._launch(message.reason)
        elif message.restart:
            await self._launch(message.reason)
        else:
            self._changed.set()  # already stopped: wake waiters

    async def _on_ready(self, run: _Run) -> None:
        if self.state not in (State.STARTING, State.UNREADY) or run.child is None:
            return
        first = self.state is State.STARTING
        if first:
            run.ready_at = time.monotonic()
            self._background(self._monitor(run), run.scope())
        reason = "startup_probe_passed" if first else "readiness_probe_passed"
        self._transition(State.READY, reason, pid=run.child.pid)
        await self._hooks.on_ready(self)

    async def _on_unready(self, run: _Run) -> None:
        if self.state is not State.READY or run.child is None:
            return
        self._transition(State.UNREADY, "readiness_probe_failed", pid=run.child.pid)
        await self._hooks.on_down(self, drain=False)

    def _on_kill(self, run: _Run, cause: str) -> None:
        if self.state not in (State.STARTING, State.READY, State.UNREADY):
            return
        assert run.child is not None
        run.cause = cause
        log.warning("instance.killing", instance=self.name, cause=cause)
        self._background(self._kill_child(run.child))

    def _on_exited(self, run: _Run, status: ExitStatus) -> None:
        assert run.child is not None
        run.cancel()
        run.status = status
        self.last_exit = {**status.to_json(), "at": time.time()}
        if run.commanded:
            return  # the stop helper reaps the group and reports _Stopped
        self._background(self._reap_after_crash(run))

    async def _on_stopped(self, run: _Run, orphans: list[int]) -> None:
        if orphans:
            self._bus.emit(
                f"instance.{self.name}.orphans_killed",
                instance=self.name,
                reason="survived_its_leader",
                pids=orphans,
            )
        if run.commanded:
            self._transition(State.STOPPED, self.reason)
            if run.restart_after:
                await self._launch("restart")
            return
        self._after_failure(run)

    def _after_failure(self, run: _Run) -> None:
        now = time.monotonic()
        stable = self._settings.restart.stable_after
        if run.ready_at is not None and now - run.ready_at >= stable:
            self._failures = 0
        self._failures += 1
        decision = policy.decide(
            self._settings.restart,
            run.status,
            cause=run.cause,
            failures=self._failures,
            recent_restarts=self._restart_times,
            now=now,
        )
        detail: dict[str, Any] = {"exit": self.last_exit}
        if run.log_tail:
            # The cause ("Address already in use", a traceback) is usually in
            # the child's last lines: put them where the operator looks.
            detail["log_tail"] = run.log_tail
        if decision.fatal:
            self._transition(State.FATAL, decision.reason, **detail)
        elif decision.restart:
            self._transition(
                State.BACKOFF, decision.reason, delay=decision.delay, **detail
            )
            self._restart_times.append(now)
            self._background(self._backoff(run, decision.delay), run.scope())
        else:
            self._transition(State.EXITED, decision.reason, **detail)

    # --------------------------------------------------------------- launch

    async def _launch(self, reason: str) -> None:
        """Check, then spawn a new process and its watchers (actor only)."""
        if self.state in RUNNING_STATES:
            return
        if reason == "backoff_over":
            self.restarts += 1
        self._gen += 1
        run = _Run(self._gen)
        self._run = run

        problems = await self._hooks.preflight(self)
        if problems:
            self._fail_before_start(run, problems[0].kind, problems)
            return
        try:
            run.child = await spawn(
                self.name,
                self.spec.argv,
                {**self.spec.env, **self._env_extra},
                self.spec.cpus,
            )
        except OSError as exc:
            self._fail_before_start(
                run, "spawn_failed", [Problem("spawn_failed", str(exc))]
            )
            return

        self._write_header(run.child)
        self._transition(State.STARTING, reason, pid=run.child.pid)
        self._hooks.on_tree(self, run.child)
        assert self._tg is not None
        self._tg.start_soon(self._watch_exit, run)
        self._tg.start_soon(self._pump, run.child)
        self._background(self._startup_probe(run), run.scope())

    def _fail_before_start(
        self, run: _Run, cause: str, problems: list[Problem]
    ) -> None:
        """A failed pre-start check or exec goes through the restart policy."""
        text = "; ".join(p.message for p in problems)
        log.error(
            "instance.not_started", instance=self.name, cause=cause, problems=text
        )
        self.last_exit = {"code": None, "signal": None, "text": text, "at": time.time()}
        run.cause = cause
        run.status = ExitStatus(code=None)
        self._after_failure(run)

    def _write_header(self, child: Child) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        header = f"===== {stamp} pdsupervisord started {self.name} pid {child.pid}\n"
        self.log_file.write(header.encode())

    async def _pump(self, child: Child) -> None:
        process = child.process
        async with anyio.create_task_group() as tg:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    tg.start_soon(pump, stream, self.log_file)

    # --------------------------------------------------------------- helpers

    def _background(
        self, work: Awaitable[None], scope: anyio.CancelScope | None = None
    ) -> None:
        assert self._tg is not None

        async def runner() -> None:
            if scope is None:
                await work
                return
            with scope:
                await work

        self._tg.start_soon(runner)

    async def _watch_exit(self, run: _Run) -> None:
        assert run.child is not None
        status = await run.child.wait()
        await self._send.send(_Exited(run.gen, status))

    async def _startup_probe(self, run: _Run) -> None:
        probes = self._settings.probes
        deadline = time.monotonic() + self.spec.startup_timeout
        self._background(self._track(run), run.scope())
        while time.monotonic() < deadline:
            if await self._hooks.probe(self, "startup"):
                await self._send.send(_Ready(run.gen))
                return
            await anyio.sleep(probes.startup_period)
        await self._send.send(_Kill(run.gen, "startup_timeout"))

    async def _track(self, run: _Run) -> None:
        """Snapshot descendants so that ones leaving the group can be killed."""
        assert run.child is not None
        for delay in TRACK_FIRST:
            await anyio.sleep(delay)
            await anyio.to_thread.run_sync(run.child.snapshot_descendants)
            self._hooks.on_tree(self, run.child)

    async def _monitor(self, run: _Run) -> None:
        """Readiness and liveness probes while the process serves."""
        probes = self._settings.probes
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._readiness, run, probes)
            tg.start_soon(self._liveness, run, probes)

    async def _readiness(self, run: _Run, probes: ProbeConfig) -> None:
        failures = successes = 0
        while True:
            await anyio.sleep(probes.readiness_period)
            if await self._hooks.probe(self, "readiness"):
                failures, successes = 0, successes + 1
                if (
                    self.state is State.UNREADY
                    and successes >= probes.readiness_successes
                ):
                    await self._send.send(_Ready(run.gen))
            else:
                failures, successes = failures + 1, 0
                if self.state is State.READY and failures >= probes.readiness_failures:
                    await self._send.send(_Unready(run.gen))

    async def _liveness(self, run: _Run, probes: ProbeConfig) -> None:
        failures = 0
        while True:
            await anyio.sleep(probes.liveness_period)
            healthy = await self._hooks.probe(self, "liveness")
            failures = 0 if healthy else failures + 1
            if failures >= probes.liveness_failures:
                await self._send.send(_Kill(run.gen, "liveness_probe_failed"))
                return

    async def _backoff(self, run: _Run, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send.send(_BackoffOver(run.gen))

    async def _stop_child(self, run: _Run, drain: bool) -> None:
        assert run.child is not None
        with anyio.CancelScope(shield=True):
            await self._hooks.on_down(self, drain=drain)
            orphans = await run.child.stop(self._settings.stop_timeout)
            self._hooks.on_tree(self, None)
        await self._send.send(_Stopped(run.gen, orphans))

    async def _kill_child(self, child: Child) -> None:
        with anyio.CancelScope(shield=True):
            await child.stop(self._settings.stop_timeout)

    async def _reap_after_crash(self, run: _Run) -> None:
        assert run.child is not None
        with anyio.CancelScope(shield=True):
            orphans = await run.child.reap_group()
            self._hooks.on_tree(self, None)
            if run.ready_at is not None:
                await self._hooks.on_down(self, drain=False)
            # The pumps have usually written the dying child's last lines by
            # now; waiting for them would put a timer on the respawn path.
            run.log_tail = await anyio.to_thread.run_sync(self._last_lines)
        await self._send.send(_Stopped(run.gen, orphans))

    def _last_lines(self, count: int = 5) -> list[str]:
        try:
            return [line[:300] for line in tail(self.log_file.path, count)]
        except OSError:
            return []
