"""Fault switches: ways the stand-in engine misbehaves on purpose.

``PDSD_ENGINE_FAULT`` is a comma-separated list; each entry re-creates one
failure a supervisor or proxy must survive:

=====================  =====================================================
``crash_at_start``     exit 1 during model load, after logging an error
``hang_at_start``      load, but never open the API port
``exit_after=N``       API server exits 1 after serving N generation requests
``die_midstream=N``    streamed: ``os._exit(1)`` after N tokens were sent;
                       non-streamed: ``os._exit(1)`` before answering
``health_503``         ready and serving, but ``/health`` answers 503
``orphan_engine``      once ready, the API server ``os._exit(1)``\\ s without
                       stopping its engine child (left holding locks and ports)
``engine_setsid``      the engine child leaves the process group (``setsid``)
``reuseport``          bind the API socket with ``SO_REUSEPORT`` (older vLLM)
``kv_link_down``       the KV side channel drops every pull: a broken P→D link
                       that ``/health`` does not see (facts §5)
=====================  =====================================================

An unknown entry is an error rather than ignored: a misspelt switch would
otherwise make a fault test pass without the fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pdsupervisord.engine.errors import EngineConfigError

__all__ = ["FAULT_VARIABLE", "Faults", "parse_faults"]

FAULT_VARIABLE = "PDSD_ENGINE_FAULT"

_FLAGS = (
    "crash_at_start",
    "hang_at_start",
    "health_503",
    "orphan_engine",
    "engine_setsid",
    "reuseport",
    "kv_link_down",
)
_COUNTS = ("exit_after", "die_midstream")


@dataclass(frozen=True)
class Faults:
    """The fault switches in force; all off by default."""

    crash_at_start: bool = False
    hang_at_start: bool = False
    exit_after: int | None = None
    die_midstream: int | None = None
    health_503: bool = False
    orphan_engine: bool = False
    engine_setsid: bool = False
    reuseport: bool = False
    kv_link_down: bool = False

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the switches that are on, for the start-up log."""
        names = [name for name in _FLAGS if getattr(self, name)]
        names += [f"{name}={getattr(self, name)}" for name in _COUNTS]
        return tuple(n for n in names if not n.endswith("=None"))


def parse_faults(env: Mapping[str, str]) -> Faults:
    """Read ``PDSD_ENGINE_FAULT`` from ``env``.

    Raises:
        EngineConfigError: On an unknown switch, a count on a flag, or a flag
            without its count.
    """
    text = env.get(FAULT_VARIABLE, "")
    flags: set[str] = set()
    counts: dict[str, int] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, count = entry.partition("=")
        if name in _FLAGS and not sep:
            flags.add(name)
        elif name in _COUNTS and sep:
            counts[name] = _count(entry, count)
        else:
            raise EngineConfigError(
                f"{FAULT_VARIABLE}: unknown fault switch {entry!r}; known: "
                + ", ".join([*_FLAGS, *(f"{n}=N" for n in _COUNTS)])
            )

    return Faults(
        crash_at_start="crash_at_start" in flags,
        hang_at_start="hang_at_start" in flags,
        exit_after=counts.get("exit_after"),
        die_midstream=counts.get("die_midstream"),
        health_503="health_503" in flags,
        orphan_engine="orphan_engine" in flags,
        engine_setsid="engine_setsid" in flags,
        kv_link_down="kv_link_down" in flags,
        reuseport="reuseport" in flags,
    )


def _count(entry: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise EngineConfigError(
            f"{FAULT_VARIABLE}: {entry!r} needs a non-negative integer count"
        )
    return value
