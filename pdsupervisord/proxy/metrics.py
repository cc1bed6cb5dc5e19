"""Prometheus metrics of the proxy, served at ``GET /metrics``.

Each proxy app has its own registry, so several can live in one process
(tests). Per-backend series are read from the pools at scrape time, so a
removed backend's series disappear with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pdsupervisord.proxy.backends import BackendState, Pool

__all__ = ["CONTENT_TYPE", "ProxyMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Spans a tiny model on CPU (tens of ms) to long prompts on a loaded
# cluster (minutes).
_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
)


class ProxyMetrics:
    """The proxy's metrics, in a registry of their own."""

    def __init__(self, pools: Sequence[Pool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "pdproxy_requests",
            "Client requests answered, by route and HTTP status "
            "(499: the client went away).",
            ["route", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "pdproxy_retries",
            "Retries after a failed upstream attempt, by the leg that failed.",
            ["leg"],
            registry=self.registry,
        )
        self.missing_kv_params = Counter(
            "pdproxy_missing_kv_transfer_params",
            "Prefill answers that carried no kv_transfer_params.",
            registry=self.registry,
        )
        self.prefill_seconds = self._histogram(
            "pdproxy_prefill_seconds", "Duration of successful prefill legs."
        )
        self.ttft_seconds = self._histogram(
            "pdproxy_time_to_first_token_seconds",
            "Arrival of a streamed request to its first relayed byte.",
        )
        self.e2e_seconds = self._histogram(
            "pdproxy_e2e_request_latency_seconds",
            "Arrival to end of answer, for successful generation requests.",
        )
        self.registry.register(_BackendCollector(pools))

    def render(self) -> bytes:
        """The current values in the Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            name, documentation, buckets=_LATENCY_BUCKETS, registry=self.registry
        )


class _BackendCollector(Collector):
    """Reads in-flight counts, states and error counts from the pools."""

    def __init__(self, pools: Iterable[Pool]) -> None:
        self._pools = tuple(pools)

    def collect(self) -> Iterator[Metric]:
        labels = ["role", "backend"]
        in_flight = GaugeMetricFamily(
            "pdproxy_backend_in_flight",
            "Requests in flight per backend.",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "pdproxy_backend_state",
            "1 for the backend's current routing state.",
            labels=[*labels, "state"],
        )
        errors = CounterMetricFamily(
            "pdproxy_backend_errors",
            "Failed upstream attempts per backend, by kind.",
            labels=[*labels, "kind"],
        )
        for pool in self._pools:
            for backend in pool:
                view = backend.view()
                ids = [view.role.value, str(view.address)]
                in_flight.add_metric(ids, view.in_flight)
                for name in BackendState:
                    state.add_metric([*ids, name.value], float(name is view.state))
                for kind, count in sorted(view.errors.items()):
                    errors.add_metric([*ids, kind], count)
        yield from (in_flight, state, errors)
