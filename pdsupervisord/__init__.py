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

from pdsupervisord.client import AsyncClient, Client, CurveKeys, EventStream
from pdsupervisord.config import Topology, load
from pdsupervisord.errors import (
    ConfigError,
    ControlError,
    DaemonUnreachableError,
    PdsError,
)
from pdsupervisord.plan import initial_plan
