"""pdsupervisord: supervise prefill/decode disaggregated vLLM serving.

The public API is the command-line tools (``pdsupervisord``,
``pdsupervisorctl``), the control protocol (docs/control-protocol.md) and the
names below; everything else is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "ControlError",
    "CurveKeys",
    "DaemonUnreachableError",
    "EventStream",
    "PdsError",
    "Topology",
    "__version__",
    "initial_plan",
    "load",
]

_HOMES = {
    "AsyncClient": "pdsupervisord.client",
    "Client": "pdsupervisord.client",
    "CurveKeys": "pdsupervisord.client",
    "EventStream": "pdsupervisord.client",
    "Topology": "pdsupervisord.config",
    "load": "pdsupervisord.config",
    "ConfigError": "pdsupervisord.errors",
    "ControlError": "pdsupervisord.errors",
    "DaemonUnreachableError": "pdsupervisord.errors",
    "PdsError": "pdsupervisord.errors",
    "initial_plan": "pdsupervisord.plan",
}


def __getattr__(name: str) -> object:
    """Import the public names on first use.

    The engine, the proxy and pdsupervisorctl are separate processes that
    need only parts of the package; eager imports cost them start-up time.
    """
    if name in _HOMES:
        import importlib  # noqa: PLC0415 - lazy on purpose

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'pdsupervisord' has no attribute {name!r}")
