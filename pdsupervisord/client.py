"""Python client for the daemon's control socket (used by pdsupervisorctl).

Example::

    from pdsupervisord.client import Client

    with Client("ipc:///run/pdsupervisord/control.sock") as client:
        for entry in client.call("status")["instances"]:
            print(entry["name"], entry["state"])
"""

from __future__ import annotations

import itertools
import json
import os
import time
from types import TracebackType
from typing import Any

import zmq

from pdsupervisord.errors import ControlError, DaemonUnreachableError
from pdsupervisord.protocol import encode_request

__all__ = ["Client"]


class Client:
    """Blocking request/reply client; one DEALER socket, bounded waits.

    A DEALER (not REQ) socket is used so that a timed-out request does not
    wedge the socket: a late reply to an old id is simply skipped.
    """

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-"
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def call(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Send ``command`` with ``args``; return the result.

        Args:
            command: The command name.
            timeout: Seconds to wait for the reply (default: the client's).
            **args: The command's arguments.

        Raises:
            DaemonUnreachableError: when no reply arrives in time.
            ControlError: when the daemon replies with an error.
        """
        wait = self.timeout if timeout is None else timeout
        request_id = f"{self._prefix}{next(self._ids)}"
        self._sock.send_multipart([b"", encode_request(request_id, command, args)])
        deadline = time.monotonic() + wait
        while self._sock.poll(_remaining_ms(deadline), zmq.POLLIN):
            reply = json.loads(self._sock.recv_multipart()[-1])
            if reply.get("id") != request_id:
                continue  # a late answer to an earlier, timed-out request
            if reply.get("ok"):
                return reply.get("result")
            error = reply.get("error") or {}
            raise ControlError(error.get("code", "unknown"), error.get("message", ""))
        raise DaemonUnreachableError(self.endpoint, wait)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _remaining_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))
