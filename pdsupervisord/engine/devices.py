"""Devices an instance is given, and the lock files that stand for their memory.

A real engine fails on a device whose memory another process holds (an
orphaned ``EngineCore`` of a previous run, facts §5). The stand-in models the
memory as an exclusive ``flock`` on ``<lock dir>/device-<id>.lock``, held by
the engine child for its whole life. The kernel drops the lock when the
holder dies, however it dies, so no stale lock survives its process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from pathlib import Path

from pdsupervisord.engine.errors import DeviceBusyError

__all__ = ["DeviceLocks", "lock_path", "visible_devices"]


def visible_devices(env: Mapping[str, str]) -> tuple[str, ...]:
    """Device ids from ``ASCEND_RT_VISIBLE_DEVICES``, else ``CUDA_VISIBLE_DEVICES``.

    Returns:
        The ids in order; empty when neither variable is set (a CPU run).
    """
    text = env.get("ASCEND_RT_VISIBLE_DEVICES") or env.get("CUDA_VISIBLE_DEVICES")
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def lock_path(lock_dir: Path, device: str) -> Path:
    """The lock file of ``device``."""
    return lock_dir / f"device-{device}.lock"


class DeviceLocks:
    """Exclusive locks on a set of devices, held until :meth:`release`."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def acquire(self, lock_dir: Path, devices: tuple[str, ...]) -> None:
        """Lock every device, writing this pid into each lock file.

        Does not block: a held lock fails at once.

        Raises:
            DeviceBusyError: When a device is locked by another process; the
                locks taken so far are released.
            OSError: When the lock directory or a file cannot be created.
        """
        lock_dir.mkdir(parents=True, exist_ok=True)
        try:
            for device in devices:
                self._fds.append(_lock(lock_path(lock_dir, device), device))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop every lock held."""
        while self._fds:
            os.close(self._fds.pop())


def _lock(path: Path, device: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise DeviceBusyError(device, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    # The holder may be between truncating and writing its pid; an unreadable
    # pid only makes the error message vaguer.
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
