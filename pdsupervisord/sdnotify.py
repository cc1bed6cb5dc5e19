"""systemd's notify protocol (``Type=notify``): a datagram to $NOTIFY_SOCKET.

Fifteen lines of socket code; the PyPI packages for this add nothing but a
dependency. Every call is a no-op when the daemon is not run by systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` and friends."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: Seconds between WATCHDOG=1 pings (half the timeout), or None.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications."""
        return bool(self.address)

    def send(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="up")``."""
        if not self.address:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        ):
            sock.sendto(message, self.address)
