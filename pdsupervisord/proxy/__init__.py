"""Built-in prefill/decode proxy: one HTTP front for P and D vLLM instances.

Runs as its own process (``python -m pdsupervisord.proxy``), accepts the flags
of vllm-ascend's example proxy, and adds a token-guarded membership API the
supervisor uses to add and drain instances. See ``docs/proxy.md``.

Modules: `backends` (pools, picking, draining, ejection), `health` (active
``/health`` probes), `protocol` (message shapes), `forward` (the two legs and
relaying), `admin` (membership API), `metrics`, `timings` (per-backend latency
histograms), `app` (routes), `state` (what handlers share), `settings`,
`errors`, `cli`.
"""

from __future__ import annotations

from pdsupervisord.proxy.app import build_app
from pdsupervisord.proxy.settings import ProxySettings

__all__ = ["ProxySettings", "build_app"]
