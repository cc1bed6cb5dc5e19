"""Stand-in-only settings, read from ``PDSD_ENGINE_*`` environment variables.

They live in the environment, not in argv, so that a rehearsal runs the very
``vllm serve`` command line of the real deployment.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pdsupervisord.engine.errors import EngineConfigError

__all__ = ["Knobs", "load_knobs", "lock_dir"]


@dataclass(frozen=True)
class Knobs:
    """Timing and placement knobs of the stand-in engine.

    Attributes:
        load_seconds: Simulated model load; the API port stays closed meanwhile.
        token_seconds: Delay per generated token.
        lock_dir: Directory of the per-device lock files.
        kv_timeout: Seconds a producer keeps KV blocks nobody pulled.
        death_exit_seconds: Seconds the API server lingers (answering 503)
            after its engine child died, before exiting with status 0.
    """

    load_seconds: float
    token_seconds: float
    lock_dir: Path
    kv_timeout: float
    death_exit_seconds: float


def lock_dir(env: Mapping[str, str]) -> Path:
    """Where the device lock files live for an engine with environment ``env``.

    The supervisor's pre-start check uses this too, so both sides agree.
    """
    default = Path(tempfile.gettempdir()) / "pdsupervisord-engine-locks"
    return Path(env.get("PDSD_ENGINE_LOCK_DIR") or default)


def load_knobs(env: Mapping[str, str]) -> Knobs:
    """Read the knobs from ``env``, applying the documented defaults.

    Raises:
        EngineConfigError: When a value is not a finite non-negative number.
    """
    return Knobs(
        load_seconds=_seconds(env, "PDSD_ENGINE_LOAD_SECONDS", 1.0),
        token_seconds=_seconds(env, "PDSD_ENGINE_TOKEN_SECONDS", 0.0),
        lock_dir=lock_dir(env),
        kv_timeout=_seconds(env, "PDSD_ENGINE_KV_TIMEOUT", 120.0),
        death_exit_seconds=_seconds(env, "PDSD_ENGINE_DEATH_EXIT_SECONDS", 5.0),
    )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError as exc:
        raise EngineConfigError(f"{name}={text!r} is not a number") from exc
    if not math.isfinite(value) or value < 0:
        raise EngineConfigError(f"{name}={text!r} must be a non-negative number")
    return value
