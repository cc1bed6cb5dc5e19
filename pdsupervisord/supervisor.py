"""The supervisor: owns every instance, orders start-up and shutdown, scales.

Ordering rules: prefill and decode instances are independent and start
concurrently; the proxy starts once at least one of each is ready, and is
stopped before them. Instances enter the proxy's rotation when they become
ready and leave it before they are stopped or as soon as they die.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anyio
import anyio.abc
import structlog

from pdsupervisord import plan as planner
from pdsupervisord.config import Topology
from pdsupervisord.errors import ScaleError
from pdsupervisord.events import Event, EventBus
from pdsupervisord.instance import Instance
from pdsupervisord.membership import TOKEN_ENV, ProxyMembership
from pdsupervisord.probes import http_ok, port_open
from pdsupervisord.states import State

__all__ = ["Supervisor", "UnknownInstanceError"]

log = structlog.get_logger("pdsupervisord.supervisor")

ENGINE_ROLES = ("prefill", "decode")
DOWN_STATES = (State.STOPPED, State.EXITED, State.FATAL)


class UnknownInstanceError(KeyError):
    """Raised when a command names an instance the daemon does not have."""


class Supervisor:
    """Runs the topology; every public coroutine is safe to call concurrently."""

    def __init__(self, topo: Topology, bus: EventBus) -> None:
        self.topo = topo
        self.bus = bus
        self.instances: dict[str, Instance] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._session: aiohttp.ClientSession | None = None
        self._membership: ProxyMembership | None = None
        self._proxy_started = False
        self._shutting_down = False
        self._scale_lock = anyio.Lock()
        self._changed = anyio.Event()
        self.ready_event = anyio.Event()
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
                tg.start_soon(self._start_proxy_when_ready)
                task_status.started()

    def _add_engine(self, role: str, index: int) -> Instance:
        spec = planner.engine_spec(self.topo, role, index)
        return self._add(spec)

    def _add(
        self, spec: planner.InstanceSpec, env: dict[str, str] | None = None
    ) -> Instance:
        daemon = self.topo.daemon
        instance = Instance(
            spec,
            self,
            restart=self.topo.restart,
            bus=self.bus,
            log_dir=daemon.log_dir,
            stop_timeout=daemon.stop_timeout,
            probe_period=daemon.probe_period,
            env_extra=env,
        )
        self.instances[spec.name] = instance
        assert self._tg is not None
        self._tg.start_soon(self._run_instance, instance)
        instance.start()
        return instance

    async def _run_instance(self, instance: Instance) -> None:
        await instance.run()
        if instance.removed and self.instances.get(instance.name) is instance:
            del self.instances[instance.name]  # scaled down: its slot is free again

    async def _start_proxy_when_ready(self) -> None:
        """Start the proxy once at least one prefill and one decode are ready."""
        while not (self._any_ready("prefill") and self._any_ready("decode")):
            await self._changed.wait()
        if self._shutting_down:
            return
        members = {role: [i.spec for i in self.engines(role)] for role in ENGINE_ROLES}
        spec = planner.proxy_spec(self.topo, members["prefill"], members["decode"])
        if spec is not None:
            assert self._membership is not None
            self._proxy_started = True
            self._add(spec, env={TOKEN_ENV: self._membership.token})
        self.ready_event.set()
        self.bus.emit("daemon.topology_started", reason="initial")

    def _any_ready(self, role: str) -> bool:
        return any(i.state is State.READY for i in self.engines(role))

    def engines(self, role: str) -> list[Instance]:
        """Instances of ``role`` (prefill or decode), by index."""
        found = [i for i in self.instances.values() if i.spec.role == role]
        return sorted(found, key=lambda i: i.spec.index)

    # ---------------------------------------------------------------- hooks

    async def probe(self, instance: Instance) -> bool:
        """Start-up probe: ``/health`` 200 for engines, port open for the proxy."""
        spec, daemon = instance.spec, self.topo.daemon
        if spec.role == "proxy":
            return await port_open(spec.host, spec.port, daemon.probe_timeout)
        assert self._session is not None
        return await http_ok(
            self._session, spec.host, spec.port, "/health", daemon.probe_timeout
        )

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

    def status(self) -> list[dict[str, Any]]:
        """One entry per instance, prefill then decode then proxy."""
        order = {"prefill": 0, "decode": 1, "proxy": 2}
        ordered = sorted(
            self.instances.values(), key=lambda i: (order[i.spec.role], i.spec.index)
        )
        return [i.status() for i in ordered]

    async def start(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """Start a stopped, exited or fatal instance."""
        instance = self.get(name)
        await instance.start().wait()
        if wait:
            await instance.wait_for(
                lambda s: s is State.READY or s in DOWN_STATES, wait
            )
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
        before = instance.pid
        await instance.restart().wait()
        if wait:
            await instance.wait_for(
                lambda s: (
                    (s is State.READY and instance.pid != before)
                    or s in (State.EXITED, State.FATAL)
                ),
                wait,
            )
        return instance.status()

    async def scale(self, role: str, count: int, wait: float = 0.0) -> dict[str, Any]:
        """Run ``count`` instances of ``role``: add from the pool or drain and stop.

        New instances take the lowest free slot; scale-down removes the
        highest-numbered instances after draining them in the proxy.

        Raises:
            ScaleError: when ``count`` is outside min..max or slots run out.
        """
        config = self.topo.role(role)
        if not config.min <= count <= config.max:
            raise ScaleError(
                f"{role} count must be within {config.min}..{config.max}, got {count}"
            )
        async with self._scale_lock:
            current = [i for i in self.engines(role) if not i.removed]
            if count > len(current):
                changed = self._scale_up(role, count - len(current))
            else:
                changed = self._scale_down(current, len(current) - count)
        if wait:
            await self._wait_scaled(changed, wait)
        return {
            "role": role,
            "count": count,
            "added": [i.name for i in changed if not i.removed],
            "removed": [i.name for i in changed if i.removed],
        }

    def _scale_up(self, role: str, extra: int) -> list[Instance]:
        used = {i.spec.index for i in self.engines(role)}
        free = [n for n in range(len(self.topo.role(role).slots)) if n not in used]
        if len(free) < extra:
            raise ScaleError(f"the {role} pool has no free slot left")
        return [self._add_engine(role, index) for index in free[:extra]]

    def _scale_down(self, current: list[Instance], fewer: int) -> list[Instance]:
        victims = sorted(current, key=lambda i: i.spec.index)[len(current) - fewer :]
        for instance in victims:
            instance.retire()
        return victims

    async def _wait_scaled(self, changed: list[Instance], timeout: float) -> None:
        async with anyio.create_task_group() as tg:
            for instance in changed:
                if instance.removed:
                    tg.start_soon(
                        instance.wait_for, lambda s: s is State.STOPPED, timeout
                    )
                else:
                    tg.start_soon(
                        instance.wait_for,
                        lambda s: s is State.READY or s in (State.EXITED, State.FATAL),
                        timeout,
                    )

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
