"""``/metrics``: the vLLM metrics a supervisor or autoscaler reads (facts §5, §7).

Same names, types and labels (``model_name``, ``engine``) as vLLM. Gauges are
computed when scraped, from callables the API server wires in, so they can
never drift from the state they describe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "KV_CAPACITY_BLOCKS", "EngineMetrics"]

#: The Prometheus text format version vLLM's endpoint answers with.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Blocks the stand-in's "KV cache" holds; ``vllm:kv_cache_usage_perc`` is
#: blocks in use over this. A guess sized so that a few requests show up.
KV_CAPACITY_BLOCKS = 2048

# Bucket bounds in seconds, spread like vLLM's over milliseconds to minutes.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)  # fmt: skip

_LABELS = ("model_name", "engine")


class EngineMetrics:
    """The engine's Prometheus metrics, in a registry of their own.

    Args:
        model_name: Value of the ``model_name`` label (the first served name).
    """

    def __init__(self, model_name: str) -> None:
        self._registry = CollectorRegistry()
        self._labels = {"model_name": model_name, "engine": "0"}

        self.running = self._gauge("vllm:num_requests_running", "Requests running.")
        self.waiting = self._gauge("vllm:num_requests_waiting", "Requests waiting.")
        self.kv_usage = self._gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent."
        )
        self.preemptions = self._counter("vllm:num_preemptions", "Preemptions.")
        self.prompt_tokens = self._counter("vllm:prompt_tokens", "Prefill tokens.")
        self.generation_tokens = self._counter(
            "vllm:generation_tokens", "Generated tokens."
        )
        self.ttft = self._histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS
        )
        self.itl = self._histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency.", _ITL_BUCKETS
        )
        self.e2e = self._histogram(
            "vllm:e2e_request_latency_seconds", "Request latency.", _E2E_BUCKETS
        )

    def watch(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_blocks: Callable[[], float],
    ) -> None:
        """Compute the gauges from these callables at every scrape.

        Args:
            running: Requests being generated.
            waiting: Requests queued for a slot.
            kv_blocks: KV blocks in use, running requests' and pinned ones'.
        """
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_usage.set_function(lambda: min(1.0, kv_blocks() / KV_CAPACITY_BLOCKS))

    def record_request(
        self,
        prompt_tokens: int,
        ttft: float,
        inter_token: Sequence[float],
        e2e: float,
    ) -> None:
        """Count one finished request: its tokens and latencies."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(len(inter_token) + 1)
        self.ttft.observe(ttft)
        for gap in inter_token:
            self.itl.observe(gap)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self._registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        metric = Gauge(name, doc, labelnames=_LABELS, registry=self._registry)
        return metric.labels(**self._labels)

    def _counter(self, name: str, doc: str) -> Counter:
        metric = Counter(name, doc, labelnames=_LABELS, registry=self._registry)
        return metric.labels(**self._labels)

    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        metric = Histogram(
            name, doc, labelnames=_LABELS, buckets=buckets, registry=self._registry
        )
        return metric.labels(**self._labels)
