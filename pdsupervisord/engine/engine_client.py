"""The API server's handle on its engine child: spawn, ask, watch, stop.

The channel is a Unix socket pair whose child end is inherited as a file
descriptor. Its end of file is the death notice: the kernel closes the
child's end however the child dies, so the API server learns of a SIGKILLed
engine at once (``/health`` turns 503 within milliseconds, facts §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from pdsupervisord.engine.channel import LINE_LIMIT, EngineSpec, encode, read_message
from pdsupervisord.engine.errors import (
    ChannelError,
    EngineDeadError,
    EngineStartError,
    KVTransferError,
)

__all__ = ["STOP_GRACE", "EngineClient"]

#: Seconds the engine child gets to exit after SIGTERM before SIGKILL, as
#: vLLM gives its engines.
STOP_GRACE = 5.0

_log: FilteringBoundLogger = structlog.get_logger("engine.api")


class EngineClient:
    """A running engine child. Create with :meth:`spawn`.

    Attributes:
        dead: Set once the engine child is gone (its channel reached end of file).
        blocks_held: KV blocks the engine child holds for remote decoders, as
            last reported by it.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._process = process
        self._writer = writer
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._ready: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self.dead = asyncio.Event()
        self.blocks_held = 0
        self._reader_task = asyncio.create_task(self._read_loop(reader))

    @property
    def pid(self) -> int:
        """The engine child's pid."""
        return self._process.pid

    @classmethod
    async def spawn(cls, spec: EngineSpec) -> EngineClient:
        """Start the engine child and send it ``spec``. Does not wait for it.

        The child stays in this process's group (no new session), like
        vLLM's EngineCore.

        Raises:
            OSError: When the process cannot be started.
        """
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pdsupervisord.engine.core",
                    "--control-fd",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()

        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        client = cls(process, reader, writer)
        writer.write(encode(spec.to_message()))
        _log.info("engine.spawned", engine_pid=process.pid)
        return client

    async def wait_ready(self) -> dict[str, Any]:
        """Wait until the engine child has loaded.

        Returns:
            The ready event (``kv_host``, ``kv_ports``).

        Raises:
            EngineStartError: When it reports a failure or exits first.
        """
        return await asyncio.shield(self._ready)

    async def store_blocks(self, request_id: str, blocks: Sequence[str]) -> list[int]:
        """Have the engine child hold ``blocks`` for a remote decoder.

        Returns:
            The block ids to advertise as ``remote_block_ids``.

        Raises:
            EngineDeadError: When the engine child is gone.
            KVTransferError: When it refuses.
        """
        reply = await self._call(
            {"op": "store", "request_id": request_id, "blocks": list(blocks)}
        )
        return [int(b) for b in reply["block_ids"]]

    async def pull_blocks(
        self, request_id: str, host: str, port: int, block_ids: Sequence[int]
    ) -> list[str]:
        """Have the engine child pull blocks from a producer.

        Raises:
            EngineDeadError: When the engine child is gone.
            KVTransferError: When the pull fails (unreachable, unknown blocks).
        """
        reply = await self._call(
            {
                "op": "pull",
                "request_id": request_id,
                "host": host,
                "port": port,
                "block_ids": list(block_ids),
            }
        )
        return [str(b) for b in reply["blocks"]]

    async def exit_code(self, timeout: float) -> int | None:
        """The engine child's exit status, waiting up to ``timeout`` seconds.

        Returns:
            The status (negative: killed by that signal), None if still running.
        """
        try:
            return await asyncio.to_thread(self._process.wait, timeout)
        except subprocess.TimeoutExpired:
            return None

    async def stop(self, grace: float = STOP_GRACE) -> int | None:
        """Stop the engine child: SIGTERM, then SIGKILL after ``grace`` seconds.

        Returns:
            Its exit status.
        """
        if self._process.poll() is None:
            self._signal(signal.SIGTERM)
            if await self.exit_code(grace) is None:
                _log.warning("engine.kill", engine_pid=self.pid, grace_s=grace)
                self._signal(signal.SIGKILL)
        code = await self.exit_code(grace)
        self._writer.close()
        self._reader_task.cancel()
        _log.info("engine.reaped", engine_pid=self.pid, exit_code=code)
        return code

    def _signal(self, signum: signal.Signals) -> None:
        # The child may have exited since poll(); Popen.send_signal does not
        # signal a reaped pid, so this cannot hit a recycled one.
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signum)

    async def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.dead.is_set():
            raise EngineDeadError("the engine core process is dead")
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[call_id] = future
        try:
            self._writer.write(encode({"id": call_id, **request}))
            reply = await future
        finally:
            self._pending.pop(call_id, None)
        if not reply.get("ok"):
            raise KVTransferError(str(reply.get("error")))
        return reply

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await read_message(reader)) is not None:
                self._dispatch(message)
        except (ChannelError, OSError) as exc:
            _log.error("engine.channel_broken", error=str(exc))
        finally:
            self._on_end_of_channel()

    def _dispatch(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "kv":
            self.blocks_held = int(message.get("blocks_held", 0))
        elif event == "ready" and not self._ready.done():
            self._ready.set_result(message)
        elif event == "failed" and not self._ready.done():
            self._ready.set_exception(EngineStartError(str(message.get("reason"))))
        elif (future := self._pending.get(message.get("id", -1))) and not future.done():
            future.set_result(message)

    def _on_end_of_channel(self) -> None:
        self.dead.set()
        self.blocks_held = 0
        if not self._ready.done():
            self._ready.set_exception(
                EngineStartError("the engine core process exited during start-up")
            )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineDeadError("the engine core process died"))
