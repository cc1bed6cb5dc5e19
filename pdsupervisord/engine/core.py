"""The engine child: the stand-in's ``VLLM::EngineCore``.

It is the part that "holds device memory": it locks the devices, owns the KV
side channel and the producer's KV blocks, and pulls blocks for a decoder.
Run by the API server as ``python -m pdsupervisord.engine.core --control-fd N``
with one end of a Unix socket pair as fd N. While loading it starts its own
child, the stand-in ``VLLM::Worker`` (``pdsupervisord.engine.worker``), which
it stops when it stops; killed with SIGKILL, it leaves the worker orphaned, as
the real EngineCore does.

Design note on its life: like the real EngineCore it stays in the API
server's process group and does NOT die with the API server. When the API
server is SIGKILLed the socket pair reaches end of file; the child logs that
it is orphaned and keeps its locks, ports and blocks until it is signalled,
which is exactly the leftover a supervisor must find and kill (facts §5, §8).
SIGTERM or SIGINT stop it cleanly with status 0; a failed device lock exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

from pdsupervisord.engine import logs
from pdsupervisord.engine.channel import LINE_LIMIT, EngineSpec, encode, read_message
from pdsupervisord.engine.devices import DeviceLocks
from pdsupervisord.engine.errors import ChannelError, DeviceBusyError, KVTransferError
from pdsupervisord.engine.kvchannel import pull_blocks, serve_side_channel
from pdsupervisord.engine.kvstore import KVStore

__all__ = ["PROCESS_NAME", "EngineCore", "main"]

#: What ``/proc/<pid>/comm`` shows: vLLM's ``VLLM::EngineCore`` cut to the
#: kernel's 15 characters, as it appears for the real process.
PROCESS_NAME = "VLLM::EngineCor"

_log: FilteringBoundLogger = structlog.get_logger("engine.core")


class EngineCore:
    """One engine child's work, from device locks to shutdown.

    Args:
        spec: What the API server asked for.
        writer: The engine child's end of the control channel.
    """

    def __init__(self, spec: EngineSpec, writer: asyncio.StreamWriter) -> None:
        self._spec = spec
        self._writer = writer
        self._stop = asyncio.Event()
        self._orphaned = False
        self._locks = DeviceLocks()
        self._store = KVStore(spec.kv_timeout, self._report_blocks)
        self._tasks: set[asyncio.Task[None]] = set()
        self._worker: subprocess.Popen[bytes] | None = None

    async def run(self, reader: asyncio.StreamReader) -> int:
        """Start, serve until signalled, stop.

        Returns:
            The exit status: 1 when a device is busy, else 0.
        """
        self._install_signal_handlers()
        if self._spec.setsid:
            os.setsid()
            _log.warning("fault.engine_setsid", pgid=os.getpgid(0))

        if not self._lock_devices():
            await self._writer.drain()  # the API server must read why
            return 1
        servers = await self._bind_side_channel()
        if servers is None:
            await self._stop.wait()
            return 0

        try:
            return await self._serve(reader)
        finally:
            await self._stop_worker()
            for server in servers:
                server.close()
            self._locks.release()
            _log.info("engine.stopped")

    async def _serve(self, reader: asyncio.StreamReader) -> int:
        self._start_worker()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._spec.load_seconds)
        if self._stop.is_set():
            return 0

        self._send(
            {
                "event": "ready",
                "kv_host": self._spec.kv_host,
                "kv_ports": list(self._spec.kv_ports),
            }
        )
        _log.info("engine.ready", devices=list(self._spec.devices))
        control = asyncio.create_task(self._read_control(reader))
        await self._stop.wait()
        control.cancel()
        return 0

    def _start_worker(self) -> None:
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "pdsupervisord.engine.worker", str(os.getpid())],
            stdin=subprocess.DEVNULL,
        )
        _log.info("engine.worker_started", worker_pid=self._worker.pid)

    async def _stop_worker(self) -> None:
        """SIGTERM the worker; SIGKILL it if it is not gone in 5 s."""
        worker = self._worker
        if worker is None or worker.poll() is not None:
            return
        worker.terminate()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if worker.poll() is not None:
                return
        worker.kill()
        worker.wait()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: signal.Signals) -> None:
        _log.info("engine.stopping", signal=signum.name)
        self._stop.set()

    def _lock_devices(self) -> bool:
        try:
            self._locks.acquire(Path(self._spec.lock_dir), self._spec.devices)
        except DeviceBusyError as exc:
            _log.error(
                "engine.device_busy",
                device=exc.device,
                holder_pid=exc.holder_pid,
                error=f"{exc}: cannot allocate device memory",
            )
            self._send({"event": "failed", "reason": str(exc)})
            return False
        except OSError as exc:
            _log.error(
                "engine.lock_failed", lock_dir=self._spec.lock_dir, error=str(exc)
            )
            self._send({"event": "failed", "reason": f"device lock failed: {exc}"})
            return False
        _log.info("engine.devices_locked", devices=list(self._spec.devices))
        return True

    async def _bind_side_channel(self) -> list[asyncio.Server] | None:
        host, ports = self._spec.kv_host, self._spec.kv_ports
        if host is None:
            return []
        try:
            servers = await serve_side_channel(
                self._store, host, ports, link_down=self._spec.link_down
            )
        except OSError as exc:
            # LLMDataDist hangs here instead of exiting (facts §3); so does
            # the stand-in, and the supervisor's start-up deadline must fire.
            _log.error(
                "kv.bind_failed",
                host=host,
                ports=list(ports),
                error=str(exc),
                consequence="engine start-up hangs",
            )
            return None
        _log.info("kv.listening", host=host, ports=list(ports))
        return servers

    async def _read_control(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await read_message(reader)
            except ChannelError as exc:
                _log.error("engine.bad_control_message", error=str(exc))
                continue
            except OSError:
                message = None
            if message is None:
                break
            task = asyncio.create_task(self._handle(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._orphaned = True
        _log.warning(
            "engine.orphaned",
            reason="API server gone",
            keeps="device locks, KV side channel and KV blocks",
        )

    async def _handle(self, message: dict[str, Any]) -> None:
        reply: dict[str, Any]
        try:
            if message.get("op") == "store":
                ids = self._store.put(str(message["request_id"]), message["blocks"])
                reply = {"ok": True, "block_ids": list(ids)}
            elif message.get("op") == "pull":
                reply = {"ok": True, "blocks": await self._pull(message)}
            else:
                reply = {"ok": False, "error": f"unknown op {message.get('op')!r}"}
        except KVTransferError as exc:
            reply = {"ok": False, "error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            reply = {"ok": False, "error": f"malformed request: {exc!r}"}
        self._send({"id": message.get("id"), **reply})

    async def _pull(self, message: dict[str, Any]) -> list[str]:
        request_id = str(message["request_id"])
        host, port = str(message["host"]), int(message["port"])
        block_ids = [int(b) for b in message["block_ids"]]

        _log.info(
            "kv.pull",
            request_id=request_id,
            remote=f"{host}:{port}",
            blocks=len(block_ids),
        )
        try:
            blocks = await pull_blocks(host, port, request_id, block_ids)
        except KVTransferError as exc:
            _log.error("kv.pull_failed", request_id=request_id, error=str(exc))
            raise
        _log.info(
            "kv.pulled",
            request_id=request_id,
            remote=f"{host}:{port}",
            blocks=len(blocks),
        )
        return blocks

    def _report_blocks(self, blocks_held: int) -> None:
        self._send({"event": "kv", "blocks_held": blocks_held})

    def _send(self, message: dict[str, Any]) -> None:
        # An orphan has nobody to tell; writing to a closed socket would only
        # produce asyncio warnings.
        if self._orphaned or self._writer.is_closing():
            return
        self._writer.write(encode(message))


async def _run(control_fd: int) -> int:
    sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
    try:
        message = await read_message(reader)
        if message is None:
            _log.error("engine.no_spec", reason="API server closed the channel")
            return 1
        spec = EngineSpec.from_message(message)
    except ChannelError as exc:
        _log.error("engine.bad_spec", error=str(exc))
        return 1
    return await EngineCore(spec, writer).run(reader)


def _set_process_name() -> None:
    # Best effort: /proc may be read-only or absent (not Linux); the name is
    # only a convenience for people and tools reading the process table.
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(PROCESS_NAME)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the engine child.

    Returns:
        The exit status (see the module docstring).
    """
    parser = argparse.ArgumentParser(prog="pdsupervisord.engine.core")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)

    _set_process_name()
    logs.configure("EngineCore")
    return asyncio.run(_run(args.control_fd))


if __name__ == "__main__":
    sys.exit(main())
