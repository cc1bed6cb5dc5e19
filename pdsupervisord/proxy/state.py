"""The state one proxy app shares between its route handlers."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from pdsupervisord.proxy.backends import Pool, Role
from pdsupervisord.proxy.forward import Forwarder
from pdsupervisord.proxy.health import HealthProber
from pdsupervisord.proxy.metrics import ProxyMetrics
from pdsupervisord.proxy.settings import ProxySettings

__all__ = ["STATE", "ProxyState"]


@dataclass(frozen=True)
class ProxyState:
    """Settings, backend pools, metrics, forwarder and prober of one proxy."""

    settings: ProxySettings
    prefill: Pool
    decode: Pool
    metrics: ProxyMetrics
    forwarder: Forwarder
    prober: HealthProber

    def pool(self, role: Role) -> Pool:
        """The pool of the given role."""
        return self.prefill if role is Role.PREFILL else self.decode


STATE = web.AppKey("pdproxy_state", ProxyState)
