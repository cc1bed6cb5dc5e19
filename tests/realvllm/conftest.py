"""Register the real-vLLM fixtures (they live in realvllm_support)."""

from realvllm_support import daemon, topology

__all__ = ["daemon", "topology"]
