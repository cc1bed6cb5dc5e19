"""Exceptions of the stand-in engine.

::

    PdsError                      (pdsupervisord.errors) root of the package
    └── EngineError               root of what the stand-in engine raises
        ├── EngineConfigError     argv, environment knob or KV config is invalid
        ├── RequestError          an HTTP request is invalid (carries status, type)
        ├── KVTransferError       pulling KV blocks from a producer failed
        ├── ChannelError          a malformed message on an engine channel
        ├── DeviceBusyError       a device lock is held by another process
        ├── EngineStartError      the engine child failed or died during start-up
        └── EngineDeadError       the engine child is gone; requests cannot be served
"""

from __future__ import annotations

from pdsupervisord.errors import PdsError

__all__ = [
    "ChannelError",
    "DeviceBusyError",
    "EngineConfigError",
    "EngineDeadError",
    "EngineError",
    "EngineStartError",
    "KVTransferError",
    "RequestError",
]


class EngineError(PdsError):
    """Root of every exception the stand-in engine raises on purpose."""


class EngineConfigError(EngineError):
    """Raised at start-up when a flag, knob or the KV transfer config is invalid.

    The message names the flag or environment variable and the offending value.
    """


class RequestError(EngineError):
    """Raised while handling an HTTP request that must be answered with an error.

    Attributes:
        status: HTTP status code to answer with.
        error_type: OpenAI error type, e.g. ``BadRequestError``.
        param: The request field at fault (the envelope's ``param``), if any.
    """

    def __init__(
        self, status: int, error_type: str, message: str, param: str | None = None
    ) -> None:
        self.status = status
        self.error_type = error_type
        self.param = param
        super().__init__(message)


class KVTransferError(EngineError):
    """Raised when KV blocks cannot be pulled from, or served to, a peer engine."""


class ChannelError(EngineError):
    """Raised when a peer sends a line that is not a JSON object."""


class DeviceBusyError(EngineError):
    """Raised when a device lock is held by another process.

    Attributes:
        device: The device id whose lock is held.
        holder_pid: Pid written into the lock file by its holder, if readable.
    """

    def __init__(self, device: str, holder_pid: int | None) -> None:
        self.device = device
        self.holder_pid = holder_pid
        holder = f"pid {holder_pid}" if holder_pid is not None else "another process"
        super().__init__(f"device {device} is in use by {holder}")


class EngineStartError(EngineError):
    """Raised when the engine child reports a start-up failure or exits early."""


class EngineDeadError(EngineError):
    """Raised by the API server's engine client once the engine child is gone."""
