"""Latency histograms kept per backend, rendered by `pdsupervisord.proxy.metrics`.

A backend's histograms live on its `Backend` object rather than in labelled
``prometheus_client`` metrics, so that they leave ``/metrics`` together with
the backend and cost one bisection and two additions per observation.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["LATENCY_BUCKETS", "LatencyHistogram"]

#: Upper bounds in seconds. They span a tiny model on CPU (tens of ms) to long
#: prompts on a loaded cluster (minutes); the lowest bound is 1 ms because the
#: proxy's own share of a request is below it.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
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


class LatencyHistogram:
    """Counts of observed durations per bucket, with their sum.

    Args:
        bounds: increasing upper bounds in seconds; ``+Inf`` is implied.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """How many durations were observed."""
        return sum(self._counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count of observations <= le)`` pairs, ending with ``+Inf``."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip(
            (*self.bounds, float("inf")), self._counts, strict=True
        ):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs
