"""Instance states, the transitions allowed between them, and exit statuses."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

__all__ = ["ExitStatus", "IllegalTransitionError", "State", "check_transition"]


class State(str, enum.Enum):
    """The life of one supervised instance.

    ``starting``: spawned, start-up probe not yet passed.
    ``ready``: healthy and (for engines) in the proxy's rotation.
    ``unready``: running but failing its readiness probe; out of rotation,
    not restarted (the liveness probe decides that).
    ``backoff``: died, failed a pre-start check or failed to start; waiting
    before the next attempt.
    ``stopping``: a stop was asked for; draining, then signalling the group.
    ``stopped``: stopped on request; stays down until started.
    ``exited``: ended on its own and the policy says not to restart it.
    ``fatal``: crash loop (too many restarts in the window); needs a start
    or a reset.
    """

    STARTING = "starting"
    READY = "ready"
    UNREADY = "unready"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FATAL = "fatal"


_DOWN_TO = frozenset(
    {State.STARTING, State.STOPPED, State.BACKOFF, State.EXITED, State.FATAL}
)
_RUNNING_TO = frozenset({State.BACKOFF, State.STOPPING, State.EXITED, State.FATAL})

_ALLOWED: dict[State, frozenset[State]] = {
    # From a state without a process, a start attempt either spawns
    # (starting) or fails its pre-start checks (backoff/exited/fatal).
    State.STOPPED: _DOWN_TO - {State.STOPPED},
    State.BACKOFF: _DOWN_TO | {State.STOPPING},
    State.EXITED: _DOWN_TO,
    State.FATAL: _DOWN_TO,
    State.STARTING: _RUNNING_TO | {State.READY},
    State.READY: _RUNNING_TO | {State.UNREADY},
    State.UNREADY: _RUNNING_TO | {State.READY},
    State.STOPPING: frozenset({State.STOPPED}),
}

#: States in which the instance has (or may have) a live process.
RUNNING_STATES = frozenset({State.STARTING, State.READY, State.UNREADY, State.STOPPING})


class IllegalTransitionError(RuntimeError):
    """Raised when code asks for a transition the state machine forbids.

    This is a programming error inside the daemon, never an operator error.
    """


def check_transition(old: State, new: State) -> None:
    """Raise :class:`IllegalTransitionError` unless ``old -> new`` is allowed."""
    if new not in _ALLOWED[old]:
        raise IllegalTransitionError(f"{old.value} -> {new.value}")


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Decode a ``Popen.returncode`` (negative means killed by a signal)."""
        if returncode < 0:
            return cls(signal=-returncode)
        return cls(code=returncode)

    def describe(self) -> str:
        """``exit code 1`` or ``killed by SIGKILL``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exit code {self.code}"

    def to_json(self) -> dict[str, object]:
        """Wire form: code, signal and their description."""
        name = None
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = None
        return {
            "code": self.code,
            "signal": name or self.signal,
            "text": self.describe(),
        }
