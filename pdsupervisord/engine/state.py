"""What the API server's request handlers share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from pdsupervisord.engine.engine_client import EngineClient
from pdsupervisord.engine.metrics import EngineMetrics
from pdsupervisord.engine.scheduler import Scheduler
from pdsupervisord.engine.settings import Settings

__all__ = ["STATE", "ApiState"]


@dataclass
class ApiState:
    """The running API server's state.

    Attributes:
        settings: The configuration.
        engine: The engine child.
        metrics: The Prometheus metrics.
        scheduler: Admission of requests.
        fault_exit: Set when fault ``exit_after`` says the server must exit.
        served: Generation requests answered so far.
    """

    settings: Settings
    engine: EngineClient
    metrics: EngineMetrics
    scheduler: Scheduler
    fault_exit: asyncio.Event = field(default_factory=asyncio.Event)
    served: int = 0

    def __post_init__(self) -> None:
        self.metrics.watch(
            running=lambda: self.scheduler.running,
            waiting=lambda: self.scheduler.waiting,
            kv_blocks=lambda: self.scheduler.running_blocks + self.engine.blocks_held,
        )
        self._check_exit_after()

    @property
    def healthy(self) -> bool:
        """What ``/health`` reports: the engine child is alive (and no fault)."""
        return not (self.engine.dead.is_set() or self.settings.faults.health_503)

    def request_served(self) -> None:
        """Count an answered generation request."""
        self.served += 1
        self._check_exit_after()

    def _check_exit_after(self) -> None:
        limit = self.settings.faults.exit_after
        if limit is not None and self.served >= limit:
            self.fault_exit.set()


STATE = web.AppKey("state", ApiState)
