"""Per-instance log files fed from the children's pipes, rotated by size.

The daemon reads each child's stdout and stderr and writes them, line by
line, to ``<log_dir>/<name>.log``. Holding the files itself (rather than
handing them to the child) is what lets it rotate by size and reopen them on
SIGUSR2 after an external logrotate, the way supervisord does.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio.abc

__all__ = ["RotatingLog", "pump", "read_from", "tail"]


class RotatingLog:
    """An append-only file rotated to ``.1`` … ``.N`` when it grows too big.

    Writes are synchronous: log lines are small and local disks fast, and a
    blocking write keeps line order exact across the two streams.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._file = self._open()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating first when it would pass the size limit."""
        size = os.fstat(self._file).st_size
        if size and size + len(data) > self._max_bytes:
            self.rotate()
        os.write(self._file, data)

    def rotate(self) -> None:
        """Shift ``name.log`` → ``.1`` → ``.2`` …, dropping the oldest."""
        os.close(self._file)
        if self._backups == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for index in range(self._backups, 0, -1):
            source = self.path if index == 1 else _backup(self.path, index - 1)
            with contextlib.suppress(FileNotFoundError):
                os.replace(source, _backup(self.path, index))
        self._file = self._open()

    def reopen(self) -> None:
        """Close and reopen the path (after an external rotation renamed it)."""
        os.close(self._file)
        self._file = self._open()

    def close(self) -> None:
        """Close the file; further writes raise."""
        with contextlib.suppress(OSError):
            os.close(self._file)


def _backup(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


async def pump(stream: anyio.abc.ByteReceiveStream, log: RotatingLog) -> None:
    """Copy ``stream`` into ``log`` until EOF, writing whole lines.

    A partial last line is written at EOF, so nothing the child printed is
    lost; lines from stdout and stderr never break into each other.
    """
    pending = b""
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
        async for chunk in stream:
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                log.write(pending[:cut])
                pending = pending[cut:]
    if pending:
        log.write(pending + b"\n")


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path``, reading backwards from the end.

    Reads only as many blocks as needed, so it is cheap on a large file; if
    the current file is shorter, the first backup supplies the rest.

    Raises:
        FileNotFoundError: when the instance has never logged anything.
    """
    found = _tail_one(path, lines)
    backup = _backup(path, 1)
    if len(found) < lines and backup.exists():
        found = _tail_one(backup, lines - len(found)) + found
    return found


def _tail_one(path: Path, lines: int, block: int = 64 * 1024) -> list[str]:
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        data = b""
        while end > 0 and data.count(b"\n") <= lines:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
    text = data.decode("utf-8", errors="replace").splitlines()
    return text[-lines:] if lines else []


def read_from(
    path: Path, offset: int, limit: int = 1024 * 1024
) -> tuple[list[str], int]:
    """Whole lines written to ``path`` since byte ``offset`` (``tail -f``).

    Returns:
        The lines and the offset to ask from next time. When the file is now
        shorter than ``offset`` (it was rotated), reading starts again at 0.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = offset if 0 <= offset <= size else 0
            handle.seek(start)
            data = handle.read(min(size - start, limit))
    except FileNotFoundError:
        return [], 0
    cut = data.rfind(b"\n") + 1
    text = data[:cut].decode("utf-8", errors="replace")
    return text.splitlines(), start + cut
