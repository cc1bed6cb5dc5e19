"""The supervision state machine of one instance, run as an actor task.

Design note: every change to an instance's state happens in one task, the
actor loop in :meth:`Instance.run`, which handles one message at a time from
its inbox. Process exits, probe results, backoff timers and operator commands
all arrive as messages, so a crash racing a ``stop`` command, or a probe
finishing after the process died, cannot interleave half-way through a
transition. Each spawn has a generation number; messages from an older
generation are ignored. Slow work (draining, killing) runs in helper tasks
that report back through the inbox, so the actor stays responsive and
``status`` always answers at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pdsupervisord import policy
from pdsupervisord.child import Child, spawn
from pdsupervisord.config import RestartConfig
from pdsupervisord.events import EventBus
from pdsupervisord.plan import InstanceSpec
from pdsupervisord.states import RUNNING_STATES, ExitStatus, State, check_transition

__all__ = ["Hooks", "Instance"]

log = structlog.get_logger("pdsupervisord.instance")


class Hooks(Protocol):
    """What an instance asks of the supervisor that owns it."""

    async def probe(self, instance: Instance) -> bool:
        """One start-up probe; True when the instance is healthy."""
        ...

    async def on_ready(self, instance: Instance) -> None:
        """The instance became ready (e.g. add it to the proxy)."""
        ...

    async def on_down(self, instance: Instance, drain: bool) -> None:
        """The instance is leaving service; with ``drain``, wait for in-flight."""
        ...


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
    handled: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Exited:
    gen: int
    status: ExitStatus


@dataclass
class _Ready:
    gen: int


@dataclass
class _StartupTimeout:
    gen: int


@dataclass
class _BackoffOver:
    gen: int


@dataclass
class _Stopped:
    gen: int
    orphans: list[int]


_Msg = _Start | _Stop | _Exited | _Ready | _StartupTimeout | _BackoffOver | _Stopped


@dataclass
class _Run:
    """Book-keeping of the current spawn."""

    gen: int
    child: Child | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    ready_at: float | None = None
    cause: str = "crashed"
    commanded: bool = False
    restart_after: bool = False
    status: ExitStatus = field(default_factory=ExitStatus)


class Instance:
    """One supervised process: spawn, probe, watch, restart, stop.

    Public methods send messages to the actor and return at once; use
    :meth:`wait_for` to block until a state is reached.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        hooks: Hooks,
        *,
        restart: RestartConfig,
        bus: EventBus,
        log_dir: Path,
        stop_timeout: float,
        probe_period: float,
        env_extra: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self._hooks = hooks
        self._restart_config = restart
        self._bus = bus
        self._log_dir = log_dir
        self._stop_timeout = stop_timeout
        self._probe_period = probe_period
        self._env = {**spec.env, **(env_extra or {})}

        self.state = State.STOPPED
        self.reason = "created"
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self._failures = 0
        self._restart_times: list[float] = []
        self._run: _Run | None = None
        self._gen = 0
        self._changed = anyio.Event()
        self._finished = False
        self.removed = False
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
    def pid(self) -> int | None:
        """The leader's pid while a process exists."""
        run = self._run
        if run and run.child and self.state in RUNNING_STATES:
            return run.child.pid
        return None

    def uptime(self) -> float | None:
        """Seconds since the current process became ready, or None."""
        run = self._run
        if run and run.ready_at is not None and self.state is State.READY:
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
        """Ask the actor to start (no-op when already running).

        Returns:
            An event set once the actor has acted on the request, so a caller
            that then waits for a state sees the state after the command.
        """
        return self._post(_Start())

    def stop(self, drain: bool = True, reason: str = "commanded") -> anyio.Event:
        """Ask the actor to stop; with ``drain`` the proxy drains it first."""
        return self._post(_Stop(drain=drain, reason=reason))

    def restart(self) -> anyio.Event:
        """Ask the actor to stop (draining) and start again."""
        return self._post(_Stop(drain=True, restart=True))

    def _post(self, message: _Start | _Stop) -> anyio.Event:
        self._send.send_nowait(message)
        return message.handled

    def finish(self) -> None:
        """Stop without draining (shutdown) and end the actor loop."""
        self._finished = True
        self._send.send_nowait(_Stop(drain=False, reason="shutdown"))

    def retire(self) -> None:
        """Drain, stop and end the actor loop for good (scale-down)."""
        self.removed = True
        self._finished = True
        self._send.send_nowait(_Stop(drain=True, reason="scaled_down"))

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
        run = self._run
        current = run is not None and getattr(message, "gen", run.gen) == run.gen
        if isinstance(message, _Start):
            await self._on_start(message)
            message.handled.set()
        elif isinstance(message, _Stop):
            await self._on_stop(message)
            message.handled.set()
        elif not current:
            log.debug("instance.stale_message", instance=self.name, message=message)
        elif isinstance(message, _Ready):
            await self._on_ready()
        elif isinstance(message, _StartupTimeout):
            self._on_startup_timeout()
        elif isinstance(message, _Exited):
            self._on_exited(message.status)
        elif isinstance(message, _Stopped):
            await self._on_stopped(message.orphans)
        elif isinstance(message, _BackoffOver):
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

    async def _on_start(self, message: _Start) -> None:
        if self.state in (State.STOPPED, State.EXITED, State.FATAL):
            self._failures = 0
            self._restart_times.clear()
            await self._launch(message.reason)
        elif self.state is State.BACKOFF and self._run:
            self._run.scope.cancel()
            await self._launch(message.reason)

    async def _on_stop(self, message: _Stop) -> None:
        run = self._run
        if self.state in (State.STARTING, State.READY) and run and run.child:
            run.commanded = True
            run.restart_after = message.restart
            self._transition(State.STOPPING, message.reason, pid=run.child.pid)
            self._background(self._stop_child(run, drain=message.drain))
        elif self.state is State.STOPPING and run:
            run.restart_after = run.restart_after or message.restart
        elif self.state in (State.BACKOFF, State.EXITED, State.FATAL):
            if run:
                run.scope.cancel()
            self._transition(State.STOPPED, message.reason)
            if message.restart:
                await self._launch(message.reason)
        elif self.state is State.STOPPED and message.restart:
            await self._launch(message.reason)
        elif self.state is State.STOPPED:
            self._changed.set()  # wake waiters: already where they want to be

    async def _on_ready(self) -> None:
        run = self._run
        if self.state is not State.STARTING or run is None or run.child is None:
            return
        run.ready_at = time.monotonic()
        self._transition(State.READY, "startup_probe_passed", pid=run.child.pid)
        await self._hooks.on_ready(self)

    def _on_startup_timeout(self) -> None:
        run = self._run
        if self.state is not State.STARTING or run is None or run.child is None:
            return
        run.cause = "startup_timeout"
        log.warning(
            "instance.startup_timeout",
            instance=self.name,
            timeout=self.spec.startup_timeout,
        )
        self._background(self._kill_child(run.child))

    def _on_exited(self, status: ExitStatus) -> None:
        run = self._run
        assert run is not None and run.child is not None
        run.scope.cancel()
        run.status = status
        self.last_exit = {**status.to_json(), "at": time.time()}
        if run.commanded:
            # The stop helper reaps the group and reports back with _Stopped.
            return
        self._background(self._reap_after_crash(run, status))

    async def _on_stopped(self, orphans: list[int]) -> None:
        run = self._run
        assert run is not None
        if run.commanded:
            self._transition(State.STOPPED, self.reason, orphans_killed=orphans)
            if run.restart_after:
                await self._launch("restart")
            return
        self._after_failure(run, orphans)

    def _after_failure(self, run: _Run, orphans: list[int]) -> None:
        now = time.monotonic()
        if run.ready_at is not None and now - run.ready_at >= (
            self._restart_config.stable_after
        ):
            self._failures = 0
        self._failures += 1
        decision = policy.decide(
            self._restart_config,
            run.status,
            cause=run.cause,
            failures=self._failures,
            recent_restarts=self._restart_times,
            now=now,
        )
        detail = {"exit": self.last_exit, "orphans_killed": orphans}
        if decision.fatal:
            self._transition(State.FATAL, decision.reason, **detail)
        elif decision.restart:
            self._transition(
                State.BACKOFF, decision.reason, delay=decision.delay, **detail
            )
            self._restart_times.append(now)
            run.scope = anyio.CancelScope()  # the old one was cancelled at exit
            self._background(self._backoff(run, decision.delay), run.scope)
        else:
            self._transition(State.EXITED, decision.reason, **detail)

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

    async def _launch(self, reason: str) -> None:
        """Spawn a new process and its watchers; only the actor calls this."""
        if self.state in (State.STARTING, State.READY, State.STOPPING):
            return
        if reason == "backoff_over":
            self.restarts += 1
        self._gen += 1
        run = _Run(self._gen)
        self._run = run
        try:
            run.child = await spawn(
                self.name, self.spec.argv, self._env, self._log_dir, self.spec.cpus
            )
        except OSError as exc:
            self._spawn_failed(run, exc)
            return
        self._transition(State.STARTING, reason, pid=run.child.pid)
        assert self._tg is not None
        self._tg.start_soon(self._watch_exit, run)
        self._background(self._startup_probe(run), run.scope)

    def _spawn_failed(self, run: _Run, exc: OSError) -> None:
        """A program that cannot be executed fails like a crash at start."""
        text = f"spawn failed: {exc}"
        self.last_exit = {"code": None, "signal": None, "text": text, "at": time.time()}
        self._transition(State.STARTING, "spawn_failed", error=str(exc))
        run.status = ExitStatus(code=127)
        run.cause = "spawn_failed"
        self._after_failure(run, [])

    async def _watch_exit(self, run: _Run) -> None:
        assert run.child is not None
        status = await run.child.wait()
        await self._send.send(_Exited(run.gen, status))

    async def _startup_probe(self, run: _Run) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout
        while time.monotonic() < deadline:
            if await self._hooks.probe(self):
                await self._send.send(_Ready(run.gen))
                return
            await anyio.sleep(self._probe_period)
        await self._send.send(_StartupTimeout(run.gen))

    async def _backoff(self, run: _Run, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send.send(_BackoffOver(run.gen))

    async def _stop_child(self, run: _Run, drain: bool) -> None:
        assert run.child is not None
        with anyio.CancelScope(shield=True):
            await self._hooks.on_down(self, drain=drain)
            orphans = await run.child.stop(self._stop_timeout)
        if orphans:
            log.warning("instance.orphans_killed", instance=self.name, pids=orphans)
        await self._send.send(_Stopped(run.gen, orphans))

    async def _kill_child(self, child: Child) -> None:
        with anyio.CancelScope(shield=True):
            await child.stop(self._stop_timeout)

    async def _reap_after_crash(self, run: _Run, status: ExitStatus) -> None:
        assert run.child is not None
        with anyio.CancelScope(shield=True):
            orphans = await run.child.reap_group()
            if run.ready_at is not None:
                await self._hooks.on_down(self, drain=False)
        if orphans:
            log.warning("instance.orphans_killed", instance=self.name, pids=orphans)
        await self._send.send(_Stopped(run.gen, orphans))
