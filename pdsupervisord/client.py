"""Python clients for the daemon's control and event sockets.

Blocking::

    from pdsupervisord.client import Client

    with Client("ipc:///run/pdsupervisord/control.sock") as client:
        for entry in client.call("status")["instances"]:
            print(entry["name"], entry["state"])

asyncio (or anyio on asyncio)::

    async with AsyncClient(endpoint) as client:
        await client.call("scale", role="prefill", count=2, wait=600)

Events::

    with EventStream("ipc:///run/pdsupervisord/events.sock", "instance.") as events:
        for event in events:
            print(event["topic"], event["reason"])

Every call has a deadline. A DEALER socket is used rather than REQ, so a
timed-out request never wedges the connection: a late answer to an old id
is skipped, and ZeroMQ reconnects by itself when the daemon restarts.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import zmq
import zmq.auth

from pdsupervisord.errors import ControlError, DaemonUnreachableError
from pdsupervisord.protocol import encode_request

__all__ = ["AsyncClient", "Client", "CurveKeys", "EventStream"]


@dataclass(frozen=True)
class CurveKeys:
    """Keys for a CurveZMQ (tcp://) endpoint: the server's public key and
    this client's key pair."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def load(cls, server_key: str | Path, client_key: str | Path) -> CurveKeys:
        """Read key files as written by ``zmq.auth.create_certificates``.

        Raises:
            OSError: when a file is missing or holds no usable key.
        """
        server_public, _ = zmq.auth.load_certificate(server_key)
        client_public, client_secret = zmq.auth.load_certificate(client_key)
        if client_secret is None:
            raise OSError(f"{client_key} holds no secret key")
        return cls(server_public, client_public, client_secret)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CurveZMQ client of the daemon."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


_B = TypeVar("_B", bound="_Blocking")


class _Blocking:
    """Close-on-exit for the blocking socket wrappers."""

    _sock: zmq.Socket[bytes]

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(0)

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Requests:
    """Shared request-id bookkeeping of both clients."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    def next_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    def result(self, reply: dict[str, Any]) -> Any:
        """The result of a reply, or its error raised as :class:`ControlError`."""
        if reply.get("ok"):
            return reply.get("result")
        error = reply.get("error") or {}
        raise ControlError(error.get("code", "unknown"), error.get("message", ""))


class Client(_Requests, _Blocking):
    """Blocking request/reply client.

    Args:
        endpoint: The daemon's control endpoint.
        timeout: Default seconds to wait for each reply.
        curve: Keys when the endpoint is a CurveZMQ ``tcp://`` one.
    """

    def __init__(
        self, endpoint: str, timeout: float = 10.0, curve: CurveKeys | None = None
    ) -> None:
        super().__init__(endpoint, timeout)
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)

    def call(
        self, command: str, *, reply_timeout: float | None = None, **args: Any
    ) -> Any:
        """Send ``command`` with ``args``; return the result.

        ``reply_timeout`` overrides the client's default deadline for this call.

        Raises:
            DaemonUnreachableError: when no reply arrives in time.
            ControlError: when the daemon replies with an error.
        """
        wait = self.timeout if reply_timeout is None else reply_timeout
        request_id = self.next_id()
        self._sock.send_multipart([b"", encode_request(request_id, command, args)])
        deadline = time.monotonic() + wait
        while self._sock.poll(_remaining_ms(deadline), zmq.POLLIN):
            reply = json.loads(self._sock.recv_multipart()[-1])
            if reply.get("id") == request_id:
                return self.result(reply)
        raise DaemonUnreachableError(self.endpoint, wait)


class AsyncClient(_Requests):
    """asyncio request/reply client; same arguments and errors as :class:`Client`.

    One request at a time per client; use several clients for concurrency.
    """

    def __init__(
        self, endpoint: str, timeout: float = 10.0, curve: CurveKeys | None = None
    ) -> None:
        super().__init__(endpoint, timeout)
        import zmq.asyncio  # noqa: PLC0415 - blocking users need not import asyncio

        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.connect(endpoint)

    async def call(
        self, command: str, *, reply_timeout: float | None = None, **args: Any
    ) -> Any:
        """Send ``command`` and await its result.

        Raises:
            DaemonUnreachableError: when no reply arrives in time.
            ControlError: when the daemon replies with an error.
        """
        wait = self.timeout if reply_timeout is None else reply_timeout
        request_id = self.next_id()
        await self._sock.send_multipart(
            [b"", encode_request(request_id, command, args)]
        )
        deadline = time.monotonic() + wait
        while await self._sock.poll(_remaining_ms(deadline)):
            frames = await self._sock.recv_multipart()
            reply = json.loads(frames[-1])
            if reply.get("id") == request_id:
                return self.result(reply)
        raise DaemonUnreachableError(self.endpoint, wait)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventStream(_Blocking):
    """Iterate over the daemon's events (blocking), optionally by topic prefix.

    Each event is the JSON body as a dict (``seq``, ``time``, ``topic``,
    ``instance``, ``old``, ``new``, ``reason``, details). ``missed`` counts the
    events lost to gaps in ``seq``: after a gap, ask ``status``.
    """

    def __init__(
        self, endpoint: str, topic: str = "", curve: CurveKeys | None = None
    ) -> None:
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._sock)
        self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sock.connect(endpoint)
        self._filtered = bool(topic)
        self._last_seq: int | None = None
        self.missed = 0

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None when none arrives within ``timeout``."""
        if timeout is not None and not self._sock.poll(int(timeout * 1000)):
            return None
        _, body = self._sock.recv_multipart()
        event: dict[str, Any] = json.loads(body)
        seq = event.get("seq")
        if isinstance(seq, int):
            # With a topic filter, gaps are other instances' events.
            if not self._filtered and self._last_seq is not None:
                self.missed += max(0, seq - self._last_seq - 1)
            self._last_seq = seq
        return event

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self.next()
            if event is not None:
                yield event


def _remaining_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))
