"""The supervisor: owns every instance, orders start-up and shutdown, scales.

Ordering rules: prefill and decode instances are independent and start
concurrently; the proxy starts once at least one of each is ready, and is
stopped before them. Instances enter the proxy's rotation when they become
ready and leave it before they are stopped or as soon as they die or turn
unready. A proxy that restarts is given the current rotation again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp
import anyio
import anyio.abc
import structlog

from pdsupervisord import canary, checks, preflight
from pdsupervisord import config as config_module
from pdsupervisord import plan as planner
from pdsupervisord.child import Child, descendants_of
from pdsupervisord.config import Topology
from pdsupervisord.errors import ConfigError, ConfigIssue, PlanError, ScaleError
from pdsupervisord.events import Event, EventBus
from pdsupervisord.instance import Instance, Settings
from pdsupervisord.logfiles import RotatingLog
from pdsupervisord.membership import TOKEN_ENV, ProxyMembership
from pdsupervisord.probes import http_ok, port_open
from pdsupervisord.statefile import StateFile
from pdsupervisord.states import State

__all__ = [
    "Supervisor",
    "UnknownInstanceError",
    "scale_result",
    "settle_predicate",
]

log = structlog.get_logger("pdsupervisord.supervisor")

ENGINE_ROLES = ("prefill", "decode")
#: Seconds between the shared scans for descendants (see _track_loop).
TRACK_PERIOD = 10.0
#: The proxy's reason while it waits for its first ready prefill and decode.
WAITING = "waiting_for_ready_prefill_and_decode"
DOWN_STATES = (State.STOPPED, State.EXITED, State.FATAL)
SERVING = (State.READY,)


class UnknownInstanceError(KeyError):
    """Raised when a command names an instance the daemon does not have."""


class Supervisor:
    """Runs the topology; every public coroutine is safe to call concurrently."""

    def __init__(
        self, topo: Topology, bus: EventBus, state: StateFile | None = None
    ) -> None:
        self.topo = topo
        self.bus = bus
        self.instances: dict[str, Instance] = {}
        self.state_file = state
        self._tg: anyio.abc.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._membership: ProxyMembership | None = None
        self._shutting_down = False
        self._scale_lock = anyio.Lock()
        self._changed = anyio.Event()
        self.ready_event = anyio.Event()
        self._reloaded = anyio.Event()
        self._reloaded.set()
        #: Pairs the canary found broken: (prefill, decode) -> error.
        self.broken_pairs: dict[tuple[str, str], str] = {}
        bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        """Wake everything waiting for 'some instance changed state'."""
        self._changed.set()
        self._changed = anyio.Event()

    # ------------------------------------------------------------------ run

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start the topology and supervise it until :meth:`shutdown`."""
        connector = aiohttp.TCPConnector(limit=64, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            self._session = session
            proxy = self.topo.proxy
            self._membership = ProxyMembership(
                session, proxy.host, proxy.port, enabled=proxy.kind == "builtin"
            )
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for role in ENGINE_ROLES:
                    for index in range(self.topo.role(role).count):
                        self._add_engine(role, index)
                self._add_proxy()
                tg.start_soon(self._start_proxy_when_ready)
                tg.start_soon(self._canary_loop)
                tg.start_soon(self._track_loop)
                task_status.started()

    def _settings(self) -> Settings:
        topo = self.topo
        return Settings(topo.restart, topo.probes, topo.daemon.stop_timeout)

    def _add_engine(self, role: str, index: int) -> Instance:
        return self._add(planner.engine_spec(self.topo, role, index))

    def _add_proxy(self) -> None:
        """Create the proxy's instance now (so status lists it), start it later."""
        spec = self._proxy_spec(self.topo)
        if spec is not None:
            assert self._membership is not None
            env = {TOKEN_ENV: self._membership.token}
            instance = self._add(spec, env=env, start=False)
            instance.reason = WAITING

    def _add(
        self,
        spec: planner.InstanceSpec,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> Instance:
        logs = self.topo.logs
        log_file = RotatingLog(
            self.topo.daemon.log_dir / f"{spec.name}.log", logs.max_bytes, logs.backups
        )
        instance = Instance(
            spec,
            self,
            settings=self._settings(),
            bus=self.bus,
            log_file=log_file,
            env_extra=env,
        )
        self.instances[spec.name] = instance
        assert self._tg is not None
        self._tg.start_soon(self._run_instance, instance)
        if start:
            instance.start()
        return instance

    async def _run_instance(self, instance: Instance) -> None:
        try:
            await instance.run()
        finally:
            instance.log_file.close()
        if instance.removed and self.instances.get(instance.name) is instance:
            del self.instances[instance.name]  # scaled down: its slot is free again

    async def _start_proxy_when_ready(self) -> None:
        """Start the proxy once at least one prefill and one decode are ready."""
        while not (self._any_ready("prefill") and self._any_ready("decode")):
            await self._changed.wait()
        proxy = self.instances.get("proxy")
        if self._shutting_down:
            return
        if (
            proxy is not None
            and proxy.state is State.STOPPED
            and proxy.reason == WAITING
        ):
            proxy.start()
        self.ready_event.set()
        self.bus.emit("daemon.topology_started", reason="initial")

    async def _track_loop(self) -> None:
        """Every TRACK_PERIOD, one scan of /proc updates every instance's tree.

        One shared scan instead of one per instance: with 64 instances the
        per-instance scans cost several percent of a core at idle.
        """
        while True:
            await anyio.sleep(TRACK_PERIOD)
            trees = {i.name: i.child.pid for i in self.instances.values() if i.child}
            found = await anyio.to_thread.run_sync(descendants_of, trees)
            for name, descendants in found.items():
                instance = self.instances.get(name)
                child = instance.child if instance else None
                if instance and child and child.remember(descendants):
                    self.on_tree(instance, child)

    async def _canary_loop(self) -> None:
        """Every ``canary_period``, try each ready P/D pair through the proxy."""
        while True:
            period = self.topo.probes.canary_period
            await anyio.sleep(period if period > 0 else 5.0)
            proxy = self.instances.get("proxy")
            builtin = self.topo.proxy.kind == "builtin"
            if period > 0 and builtin and proxy and proxy.state is State.READY:
                await self._canary_round()

    async def _canary_round(self) -> None:
        assert self._session is not None and self._membership is not None
        topo = self.topo
        pairs = [
            canary.Pair(p.name, p.spec.address, d.name, d.spec.address)
            for p in self.engines("prefill")
            for d in self.engines("decode")
            if p.state is State.READY and d.state is State.READY
        ]
        model = topo.served_name or topo.model_path
        proxy = (topo.proxy.host, topo.proxy.port)
        for pair in pairs:
            error = await canary.check_pair(
                self._session,
                proxy,
                token=self._membership.token,
                model=model,
                pair=pair,
                timeout=topo.probes.canary_timeout,
            )
            self._canary_result(pair, error)

    def _canary_result(self, pair: canary.Pair, error: str | None) -> None:
        key = (pair.prefill, pair.decode)
        was_broken = key in self.broken_pairs
        if error is not None:
            self.broken_pairs[key] = error
            if not was_broken:
                self.bus.emit(
                    "daemon.pair_broken",
                    reason="canary_failed",
                    prefill=pair.prefill,
                    decode=pair.decode,
                    error=error,
                )
        elif was_broken:
            del self.broken_pairs[key]
            self.bus.emit(
                "daemon.pair_recovered",
                reason="canary_passed",
                prefill=pair.prefill,
                decode=pair.decode,
            )

    def _proxy_spec(self, topo: Topology) -> planner.InstanceSpec | None:
        members = {role: [i.spec for i in self.engines(role)] for role in ENGINE_ROLES}
        return planner.proxy_spec(topo, members["prefill"], members["decode"])

    def _any_ready(self, role: str) -> bool:
        return any(i.state is State.READY for i in self.engines(role))

    def engines(self, role: str) -> list[Instance]:
        """Instances of ``role`` (prefill or decode), by index."""
        found = [i for i in self.instances.values() if i.spec.role == role]
        return sorted(found, key=lambda i: i.spec.index)

    def summary(self) -> str:
        """One line for systemd's STATUS=: ``2/2 prefill, 1/1 decode, proxy ready``."""
        parts = []
        for role in ENGINE_ROLES:
            members = [i for i in self.engines(role) if not i.removed]
            ready = sum(i.state is State.READY for i in members)
            parts.append(f"{ready}/{len(members)} {role}")
        proxy = self.instances.get("proxy")
        if proxy is None:
            parts.append("no proxy")
        elif proxy.state is State.STOPPED and proxy.reason == WAITING:
            parts.append("proxy waiting")
        else:
            parts.append(f"proxy {proxy.state.value}")
        return ", ".join(parts)

    # ---------------------------------------------------------------- hooks

    async def probe(self, instance: Instance, kind: str) -> bool:
        """``/health`` 200 for engines; the proxy's port accepting connections."""
        spec, timeout = instance.spec, self.topo.probes.timeout
        if spec.role == "proxy":
            return await port_open(spec.host, spec.port, timeout)
        assert self._session is not None
        return await http_ok(self._session, spec.host, spec.port, "/health", timeout)

    async def preflight(self, instance: Instance) -> list[preflight.Problem]:
        """Ports and devices free? Runs in a thread (psutil scans block)."""
        spec, checks = instance.spec, self.topo.checks
        return await anyio.to_thread.run_sync(preflight.check_instance, spec, checks)

    async def on_ready(self, instance: Instance) -> None:
        """Add a ready engine to the proxy; resend membership to a new proxy."""
        assert self._membership is not None
        if instance.spec.role == "proxy":
            self._membership.up = True
            await self._sync_membership()
            return
        await self._membership.add(instance.spec.role, instance.spec.address)

    async def on_down(self, instance: Instance, drain: bool) -> None:
        """Take an engine out of rotation; draining waits for in-flight work."""
        assert self._membership is not None
        if instance.spec.role == "proxy":
            self._membership.up = False
            return
        timeout = self.topo.daemon.stop_timeout if drain else 0.0
        await self._membership.remove(
            instance.spec.role, instance.spec.address, timeout
        )

    def on_tree(self, instance: Instance, child: Child | None) -> None:
        """Keep the state file in step with the processes we own."""
        if self.state_file is None:
            return
        if child is None:
            self.state_file.forget(instance.name)
        else:
            self.state_file.record(instance.name, child.pid, child.known)

    async def _sync_membership(self) -> None:
        """Give a (re)started proxy the current rotation: ready in, others out."""
        assert self._membership is not None
        for role in ENGINE_ROLES:
            for instance in self.engines(role):
                if instance.state is State.READY:
                    await self._membership.add(role, instance.spec.address)
                else:
                    await self._membership.remove(role, instance.spec.address, 0.0)

    # ------------------------------------------------------------- commands

    def get(self, name: str) -> Instance:
        """Return the instance called ``name``.

        Raises:
            UnknownInstanceError: when there is none.
        """
        try:
            return self.instances[name]
        except KeyError:
            raise UnknownInstanceError(name) from None

    def select(self, target: str) -> list[Instance]:
        """Instances named ``target``, or all of role ``target``.

        Raises:
            UnknownInstanceError: when nothing matches.
        """
        if target in self.instances:
            return [self.instances[target]]
        found = [i for i in self.ordered() if i.spec.role == target]
        if not found:
            raise UnknownInstanceError(target)
        return found

    def ordered(self) -> list[Instance]:
        """Instances in status order: prefill, decode, proxy; by index."""
        order = {"prefill": 0, "decode": 1, "proxy": 2}
        return sorted(
            self.instances.values(), key=lambda i: (order[i.spec.role], i.spec.index)
        )

    def status(self) -> list[dict[str, Any]]:
        """One entry per instance, prefill then decode then proxy."""
        return [i.status() for i in self.ordered()]

    async def start(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """Start a stopped, exited or fatal instance (clears its crash loop)."""
        instance = self.get(name)
        await instance.start().wait()
        if wait:
            await instance.wait_for(_settled, wait)
        return instance.status()

    async def stop(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """Stop an instance (draining it from the proxy first); no restart."""
        instance = self.get(name)
        await instance.stop().wait()
        if wait:
            await instance.wait_for(lambda s: s is State.STOPPED, wait)
        return instance.status()

    async def restart(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """Stop then start an instance."""
        instance = self.get(name)
        await instance.restart().wait()
        if wait:
            await instance.wait_for(_settled, wait)
        return instance.status()

    async def reset(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """Clear ``fatal`` (or ``exited``): forget the crash loop and start again.

        Raises:
            ScaleError: never; a running instance is left alone.
        """
        return await self.start(name, wait)

    async def scale(self, role: str, count: int, wait: float = 0.0) -> dict[str, Any]:
        """Run ``count`` instances of ``role``: add from the pool or drain and stop.

        New instances take the lowest free slot; scale-down removes the
        highest-numbered instances after draining them in the proxy.

        Raises:
            ScaleError: when ``count`` is outside min..max or slots run out.
        """
        changed = await self.rescale(role, count)
        if wait:
            await self.wait_settled(changed, wait)
        return scale_result(role, count, changed)

    def check_scale(self, role: str, count: int) -> None:
        """Raise :class:`ScaleError` unless ``count`` is within min..max."""
        config = self.topo.role(role)
        if not config.min <= count <= config.max:
            raise ScaleError(
                f"{role} count must be within {config.min}..{config.max}, got {count}"
            )

    async def rescale(self, role: str, count: int) -> list[Instance]:
        """Start or retire instances so ``count`` of ``role`` run; returns
        the instances added or retired (not waiting for them).

        Raises:
            ScaleError: when ``count`` is outside min..max or slots run out.
        """
        self.check_scale(role, count)
        async with self._scale_lock:
            current = [i for i in self.engines(role) if not i.removed]
            if count > len(current):
                changed = self._scale_up(role, count - len(current))
            else:
                changed = self._scale_down(current, len(current) - count)
        self.bus.emit("daemon.scaled", reason="commanded", role=role, count=count)
        return changed

    def _scale_up(self, role: str, extra: int) -> list[Instance]:
        used = {i.spec.index for i in self.engines(role)}
        free = [n for n in range(len(self.topo.role(role).slots)) if n not in used]
        if len(free) < extra:
            raise ScaleError(f"the {role} pool has no free slot left")
        return [self._add_engine(role, index) for index in free[:extra]]

    def _scale_down(self, current: list[Instance], fewer: int) -> list[Instance]:
        # Instances that are not serving go first (an operator's stopped one,
        # a crash-looping one); among equals, the highest index.
        def keep_first(i: Instance) -> tuple[bool, int]:
            return (
                i.state in (State.READY, State.STARTING, State.UNREADY),
                -i.spec.index,
            )

        victims = sorted(current, key=keep_first)[:fewer]
        for instance in victims:
            instance.retire()
        return victims

    async def wait_settled(self, changed: list[Instance], timeout: float) -> None:
        """Wait until added instances are ready (or given up) and retired
        ones stopped, at most ``timeout`` seconds."""
        async with anyio.create_task_group() as tg:
            for instance in changed:
                done: Callable[[State], bool] = (
                    (lambda s: s is State.STOPPED) if instance.removed else _settled
                )
                tg.start_soon(instance.wait_for, done, timeout)

    # --------------------------------------------------------------- reload

    def plan_reload(self, new: Topology) -> dict[str, list[str]]:
        """Compare the running topology with ``new``; pure, changes nothing."""
        diff: dict[str, list[str]] = {
            "unchanged": [],
            "restart": [],
            "remove": [],
            "add": [],
            "ignored": [],
        }
        for role in ENGINE_ROLES:
            running = [i for i in self.engines(role) if not i.removed]
            config = new.role(role)
            count = max(config.min, min(len(running), config.max, len(config.slots)))
            for instance in running:
                if instance.spec.index >= count:
                    diff["remove"].append(instance.name)
                elif (
                    planner.engine_spec(new, role, instance.spec.index) == instance.spec
                ):
                    diff["unchanged"].append(instance.name)
                else:
                    diff["restart"].append(instance.name)
            present = {i.spec.index for i in running}
            diff["add"] += [f"{role}-{n}" for n in range(count) if n not in present]
        proxy = self.instances.get("proxy")
        if proxy is not None:
            same = self._proxy_spec(new) == self._proxy_spec(self.topo)
            diff["unchanged" if same else "restart"].append("proxy")
        diff["ignored"] = _daemon_changes(self.topo, new)
        return diff

    async def reload(self, new: Topology, wait: float = 0.0) -> dict[str, list[str]]:
        """Apply ``new``: keep unchanged instances, roll changed ones one at a
        time, drain and stop removed ones, start new ones.

        Settings the daemon cannot change while running (endpoints, run and
        log directories) are listed under ``ignored`` and need a restart.
        """
        diff = self.plan_reload(new)
        self.topo = dataclasses.replace(new, daemon=self.topo.daemon)
        settings = self._settings()
        for instance in self.instances.values():
            instance._settings = settings
        self.bus.emit("daemon.reloading", reason="commanded", changes=diff)
        assert self._tg is not None
        done = self._reloaded = anyio.Event()
        self._tg.start_soon(self._apply_reload, diff, done)
        if wait:
            await self.wait_reloaded(wait)
        return diff

    async def wait_reloaded(self, timeout: float) -> bool:
        """Wait for the last reload to be fully applied; False on timeout."""
        with anyio.move_on_after(timeout):
            await self._reloaded.wait()
            return True
        return False

    async def _apply_reload(
        self, diff: dict[str, list[str]], done: anyio.Event
    ) -> None:
        for name in diff["remove"]:
            self.instances[name].retire("reloaded")
        for name in diff["add"]:
            role, _, index = name.rpartition("-")
            self._add_engine(role, int(index))
        for name in diff["restart"]:
            instance = self.instances[name]
            spec = (
                self._proxy_spec(self.topo)
                if name == "proxy"
                else planner.engine_spec(
                    self.topo, instance.spec.role, instance.spec.index
                )
            )
            await instance.restart(spec).wait()
            timeout = (
                spec.startup_timeout + self.topo.daemon.stop_timeout if spec else 0
            )
            await instance.wait_for(_settled, timeout)
        self.bus.emit("daemon.reloaded", reason="commanded")
        done.set()

    async def reload_file(self, wait: float = 0.0) -> dict[str, list[str]]:
        """Re-read the topology file and apply it (SIGHUP and ``reload``).

        Raises:
            ConfigError: when the file is invalid; nothing is changed.
            PlanError: when it cannot be planned; nothing is changed.
        """
        try:
            new = config_module.load(self.topo.source)
            planner.initial_plan(new)
            _raise_errors(await checks.before_first_start(new))
        except (ConfigError, PlanError) as exc:
            self.bus.emit(
                "daemon.reload_failed", reason="invalid_config", error=str(exc)
            )
            raise
        return await self.reload(new, wait)

    def reopen_logs(self) -> None:
        """Reopen every instance's log file (after an external logrotate)."""
        for instance in self.instances.values():
            instance.log_file.reopen()
        self.bus.emit("daemon.logs_reopened", reason="signal")

    # ------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop the proxy, then every engine concurrently; returns when all are down."""
        self._shutting_down = True
        self.bus.emit("daemon.stopping", reason="commanded")
        proxy = self.instances.get("proxy")
        if proxy is not None:
            proxy.finish()
            await proxy.wait_for(lambda s: s is State.STOPPED, self._stop_budget())
        async with anyio.create_task_group() as tg:
            for instance in list(self.instances.values()):
                instance.finish()
                tg.start_soon(
                    instance.wait_for, lambda s: s is State.STOPPED, self._stop_budget()
                )
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _stop_budget(self) -> float:
        return self.topo.daemon.stop_timeout + 15.0


def _raise_errors(findings: list[checks.Finding]) -> None:
    """Turn the topology checks' errors into a :class:`ConfigError`."""
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise ConfigError(
            [ConfigIssue(f.file, f.line, f.key, f.message) for f in errors]
        )


def scale_result(role: str, count: int, changed: list[Instance]) -> dict[str, Any]:
    """The ``scale`` reply: what was added and what removed."""
    return {
        "role": role,
        "count": count,
        "added": [i.name for i in changed if not i.removed],
        "removed": [i.name for i in changed if i.removed],
    }


def settle_predicate(verb: str) -> Callable[[State], bool]:
    """When a ``start``/``stop``/``restart``/``reset`` counts as done."""
    return (lambda s: s is State.STOPPED) if verb == "stop" else _settled


def _settled(state: State) -> bool:
    """Ready, or given up on (exited, fatal): the caller waits no longer.

    Not ``stopped``: a restart passes through it on its way up.
    """
    return state in (State.READY, State.EXITED, State.FATAL)


def _daemon_changes(old: Topology, new: Topology) -> list[str]:
    """Daemon settings that only a restart applies."""
    return [
        f"daemon.{f.name}"
        for f in dataclasses.fields(old.daemon)
        if getattr(old.daemon, f.name) != getattr(new.daemon, f.name)
    ]
