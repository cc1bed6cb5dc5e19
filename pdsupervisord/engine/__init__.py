"""The stand-in vLLM engine: ``vllm serve`` without a model or an accelerator.

Run as ``python -m pdsupervisord.engine serve MODEL [vllm serve flags...]``.
It behaves like vLLM wherever a supervisor or a PD proxy can see it (ports,
process tree, exit codes, ``/health``, ``/metrics``, OpenAI answers, the
``kv_transfer_params`` handoff), so topologies can be rehearsed on any
machine. ``docs/standin-engine.md`` describes it for operators.

Modules, from the entry point inward:

- ``__main__`` / ``apiserver``: the API server process and how it ends.
- ``settings`` (``cli``, ``knobs``, ``faults``, ``kvconfig``, ``devices``):
  configuration from argv and environment.
- ``server`` / ``serving``: the HTTP routes and one generation request's path.
- ``protocol`` / ``generate``: OpenAI shapes and deterministic output (pure).
- ``engine_client`` / ``channel`` / ``core``: the engine child and its channel.
- ``kvstore`` / ``kvchannel``: KV blocks held by a producer, and pulling them.
- ``metrics`` / ``scheduler`` / ``state`` / ``logs`` / ``errors``.

Nothing is exported: the engine is used as a program, not as a library.
"""

from __future__ import annotations

__all__: list[str] = []
