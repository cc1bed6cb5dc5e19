"""Restart decisions: pure functions of the policy, the exit and the history.

No clock and no I/O here, so every rule is unit-tested without processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdsupervisord.config import RestartConfig
from pdsupervisord.states import ExitStatus

__all__ = ["Decision", "backoff_delay", "decide"]


@dataclass(frozen=True)
class Decision:
    """What to do after an exit nobody asked for.

    Attributes:
        restart: Whether to start the instance again.
        delay: Seconds to wait first (the backoff).
        fatal: True when the crash-loop limit was hit.
        reason: One word for status and events: ``crashed``, ``exited``,
            ``startup_timeout``, ``crash_loop``, ``policy_never``, ...
    """

    restart: bool
    delay: float
    fatal: bool
    reason: str


def backoff_delay(config: RestartConfig, failures: int) -> float:
    """Delay before attempt number ``failures`` (1-based) in a failure streak.

    The first failure of a streak restarts at once (react to the exit, not a
    timer); from the second on the delay is ``backoff_initial`` times
    ``backoff_factor`` per further failure, capped at ``backoff_max``. A
    streak ends after ``stable_after`` seconds of healthy running.
    """
    if failures <= 1:
        return 0.0
    delay = config.backoff_initial * config.backoff_factor ** (failures - 2)
    return float(min(delay, config.backoff_max))


def is_success(config: RestartConfig, status: ExitStatus) -> bool:
    """Whether an unrequested exit counts as success.

    Only codes listed in ``success_exit_codes`` do: vLLM's API server exits 0
    when its engine dies, so a bare 0 nobody asked for is a failure.
    """
    return status.code is not None and status.code in config.success_exit_codes


def decide(
    config: RestartConfig,
    status: ExitStatus,
    *,
    cause: str,
    failures: int,
    recent_restarts: Sequence[float],
    now: float,
) -> Decision:
    """Decide what follows an exit that was not commanded.

    Args:
        config: The restart policy.
        status: How the process ended.
        cause: ``crashed`` or ``startup_timeout`` (how it came to end).
        failures: Length of the current failure streak, this exit included.
        recent_restarts: Times (monotonic) of earlier restarts.
        now: Monotonic now.
    """
    success = is_success(config, status)
    reason = "exited" if success else cause
    if config.policy == "never" or (config.policy == "on-failure" and success):
        return Decision(False, 0.0, False, reason)

    in_window = [t for t in recent_restarts if now - t <= config.restart_window]
    if len(in_window) >= config.max_restarts:
        return Decision(False, 0.0, True, "crash_loop")
    return Decision(True, backoff_delay(config, failures), False, reason)
