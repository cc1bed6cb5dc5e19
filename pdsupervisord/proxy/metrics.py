"""Prometheus metrics of the proxy, served at ``GET /metrics``.

Each proxy app has its own registry, so several can live in one process
(tests). Per-backend series are read from the pools at scrape time, so a
removed backend's series disappear with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pdsupervisord.proxy.backends import Backend, BackendState, Pool, Role
from pdsupervisord.proxy.timings import LATENCY_BUCKETS

__all__ = ["CONTENT_TYPE", "ProxyMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


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
        # labels() takes a lock and builds a key: children are cached here,
        # one per route and status seen.
        self._request_children: dict[tuple[str, int], Any] = {}

    def count_request(self, route: str, status: int) -> None:
        """Count one answered generation request."""
        child = self._request_children.get((route, status))
        if child is None:
            child = self.requests.labels(route, str(status))
            self._request_children[(route, status)] = child
        child.inc()

    def render(self) -> bytes:
        """The current values in the Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            name, documentation, buckets=LATENCY_BUCKETS, registry=self.registry
        )


_PER_BACKEND = ["role", "backend"]


class _BackendCollector(Collector):
    """Reads each backend's live numbers from the pools at scrape time."""

    def __init__(self, pools: Iterable[Pool]) -> None:
        self._pools = tuple(pools)

    def collect(self) -> Iterator[Metric]:
        families = _backend_families()
        for pool in self._pools:
            for backend in pool:
                _add_backend(families, backend)
        yield from families.values()


def _backend_families() -> dict[str, Metric]:
    labels = _PER_BACKEND
    return {
        "in_flight": GaugeMetricFamily(
            "pdproxy_backend_in_flight", "Requests in flight.", labels=labels
        ),
        "load": GaugeMetricFamily(
            "pdproxy_backend_load",
            "Prompt bytes in flight (the prefill pick key).",
            labels=labels,
        ),
        "requests": CounterMetricFamily(
            "pdproxy_backend_requests",
            "Upstream attempts sent to the backend.",
            labels=labels,
        ),
        "state": GaugeMetricFamily(
            "pdproxy_backend_state",
            "1 for the backend's current routing state.",
            labels=[*labels, "state"],
        ),
        "healthy": GaugeMetricFamily(
            "pdproxy_backend_healthy",
            "1 while the health probe finds the backend healthy.",
            labels=labels,
        ),
        "errors": CounterMetricFamily(
            "pdproxy_backend_errors",
            "Failed upstream attempts, by kind.",
            labels=[*labels, "kind"],
        ),
        "probes": CounterMetricFamily(
            "pdproxy_backend_health_probes",
            "Health probes, by result (ok or the failure's kind).",
            labels=[*labels, "result"],
        ),
        "ejections": CounterMetricFamily(
            "pdproxy_backend_ejections",
            "Times the backend was taken out of rotation, by cause.",
            labels=[*labels, "reason"],
        ),
        "prefill": HistogramMetricFamily(
            "pdproxy_backend_prefill_seconds",
            "Duration of successful prefill legs on this prefiller.",
            labels=labels,
        ),
        "ttft": HistogramMetricFamily(
            "pdproxy_backend_time_to_first_token_seconds",
            "Arrival to first relayed byte of streamed requests this decoder served.",
            labels=labels,
        ),
        "e2e": HistogramMetricFamily(
            "pdproxy_backend_e2e_request_latency_seconds",
            "Arrival to end of answer of successful requests this decoder served.",
            labels=labels,
        ),
    }


def _add_backend(families: dict[str, Metric], backend: Backend) -> None:
    ids = [backend.role.value, str(backend.address)]
    _gauge(families["in_flight"]).add_metric(ids, backend.in_flight)
    _gauge(families["load"]).add_metric(ids, backend.load)
    _counter(families["requests"]).add_metric(ids, backend.requests)
    _gauge(families["healthy"]).add_metric(ids, float(backend.healthy))
    state = _gauge(families["state"])
    for name in BackendState:
        state.add_metric([*ids, name.value], float(name is backend.state))
    for key, counts in (
        ("errors", backend.errors),
        ("probes", backend.probes),
        ("ejections", backend.ejections),
    ):
        family = _counter(families[key])
        for kind, count in sorted(counts.items()):
            family.add_metric([*ids, kind], count)

    if backend.role is Role.PREFILL:
        timed = [("prefill", backend.prefill_seconds)]
    else:
        timed = [("ttft", backend.first_token_seconds), ("e2e", backend.e2e_seconds)]
    for key, histogram in timed:
        histograms = families[key]
        assert isinstance(histograms, HistogramMetricFamily)
        histograms.add_metric(ids, histogram.cumulative(), histogram.sum)


def _gauge(family: Metric) -> GaugeMetricFamily:
    assert isinstance(family, GaugeMetricFamily)
    return family


def _counter(family: Metric) -> CounterMetricFamily:
    assert isinstance(family, CounterMetricFamily)
    return family
