"""Restart decisions, without processes."""

from __future__ import annotations

import pytest

from pdsupervisord.config import RestartConfig
from pdsupervisord.policy import backoff_delay, decide
from pdsupervisord.states import (
    ExitStatus,
    IllegalTransitionError,
    State,
    check_transition,
)

CRASH = ExitStatus(signal=9)
ZERO = ExitStatus(code=0)


def test_first_failure_restarts_at_once_then_backoff_grows_and_is_capped() -> None:
    config = RestartConfig(backoff_initial=1, backoff_factor=2, backoff_max=5)
    assert [backoff_delay(config, n) for n in range(1, 7)] == [0, 1, 2, 4, 5, 5]


def test_always_restarts_a_crash_with_backoff() -> None:
    decision = decide(
        RestartConfig(),
        CRASH,
        cause="crashed",
        failures=3,
        recent_restarts=[],
        now=100.0,
    )
    assert decision.restart and not decision.fatal
    assert decision.delay == 2.0 and decision.reason == "crashed"


def test_unrequested_exit_zero_is_a_failure_under_on_failure() -> None:
    """vLLM's API server exits 0 when its engine dies (facts §8)."""
    decision = decide(
        RestartConfig(policy="on-failure"),
        ZERO,
        cause="crashed",
        failures=1,
        recent_restarts=[],
        now=0.0,
    )
    assert decision.restart and decision.reason == "crashed"


def test_listed_success_code_is_not_restarted_under_on_failure() -> None:
    config = RestartConfig(policy="on-failure", success_exit_codes=(0,))
    decision = decide(
        config, ZERO, cause="crashed", failures=1, recent_restarts=[], now=0.0
    )
    assert not decision.restart and decision.reason == "exited"


def test_never_policy_does_not_restart() -> None:
    decision = decide(
        RestartConfig(policy="never"),
        CRASH,
        cause="crashed",
        failures=1,
        recent_restarts=[],
        now=0.0,
    )
    assert not decision.restart and not decision.fatal


def test_crash_loop_inside_window_is_fatal() -> None:
    config = RestartConfig(max_restarts=3, restart_window=60)
    decision = decide(
        config,
        CRASH,
        cause="crashed",
        failures=4,
        recent_restarts=[10.0, 20.0, 30.0],
        now=40.0,
    )
    assert decision.fatal and decision.reason == "crash_loop"


def test_old_restarts_fall_out_of_the_window() -> None:
    config = RestartConfig(max_restarts=3, restart_window=60)
    decision = decide(
        config,
        CRASH,
        cause="crashed",
        failures=1,
        recent_restarts=[10.0, 20.0, 30.0],
        now=200.0,
    )
    assert decision.restart and not decision.fatal


def test_startup_timeout_keeps_its_reason() -> None:
    decision = decide(
        RestartConfig(),
        ExitStatus(signal=15),
        cause="startup_timeout",
        failures=1,
        recent_restarts=[],
        now=0,
    )
    assert decision.reason == "startup_timeout"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.STOPPED, State.READY),
        (State.STOPPING, State.STARTING),
        (State.READY, State.STARTING),
    ],
)
def test_illegal_transitions_are_refused(old: State, new: State) -> None:
    with pytest.raises(IllegalTransitionError):
        check_transition(old, new)


def test_exit_status_describes_signal_and_code() -> None:
    assert ExitStatus.from_returncode(-9).describe() == "killed by SIGKILL"
    assert ExitStatus.from_returncode(3).describe() == "exit code 3"
