"""The package's exception tree.

::

    PdsError                      root of everything this package raises on purpose
    ├── ConfigError               the topology file is unreadable or invalid
    ├── PlanError                 a valid topology cannot be turned into commands
    ├── AscendError               an NPU tool failed or a rank table cannot be made
    ├── ControlError              a control request failed (carries a wire error code)
    │   └── DaemonUnreachableError     no daemon answered within the deadline
    └── ScaleError                a scale request cannot be satisfied (pool, bounds)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PdsError(Exception):
    """Root of every exception pdsupervisord raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem found in a topology file.

    Attributes:
        file: Path of the TOML file.
        line: 1-based line of the offending key, or None when not locatable.
        key: Dotted key path, e.g. ``prefill.instances[0].port``.
        message: What is wrong, in words an operator can act on.
    """

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.key}: {self.message}"
            if self.key
            else (f"{where}: {self.message}")
        )


class ConfigError(PdsError):
    """Raised when a topology file cannot be read or is invalid.

    All problems are collected first, so one run reports all of them.
    """

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class PlanError(PdsError):
    """Raised when a valid topology cannot be turned into instance commands."""


class AscendError(PdsError):
    """Raised when the NPU tools cannot answer or a rank table cannot be made.

    ``hccn_tool`` or ``npu-smi`` missing, failing or timing out, a device whose
    IP is unreadable (``-.-.-.-``), a missing ``/etc/hccn.conf``, or a rank
    table that cannot be written. Every problem found is collected first.

    Attributes:
        problems: One message per problem, each naming the device or file.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class ScaleError(PdsError):
    """Raised when a scale request is outside min/max or the pool is exhausted."""


class ControlError(PdsError):
    """Raised by the client when the daemon answers a request with an error.

    Attributes:
        code: The wire error code (see ``pdsupervisord.protocol.ErrorCode``).
        message: The daemon's explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class DaemonUnreachableError(ControlError):
    """Raised by the client when no daemon answers within the deadline."""

    def __init__(self, endpoint: str, timeout: float, why: str = "") -> None:
        why = why or f"no answer from {endpoint} within {timeout:g} s"
        super().__init__("unreachable", why)
