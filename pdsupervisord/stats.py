"""CPU and memory of each instance's whole process tree (the ``stats`` command)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import psutil

__all__ = ["TreeStats"]


class TreeStats:
    """Measures process trees; CPU% is over the time since the previous call.

    ``psutil.Process.cpu_percent`` needs the same Process object across
    calls, so they are cached by (pid, start time); a recycled pid gets a new
    object. Blocking (reads /proc): call it in a worker thread.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[int, float], psutil.Process] = {}

    def measure(self, trees: dict[str, int]) -> dict[str, dict[str, Any]]:
        """For each name -> leader pid: pids, count, summed CPU% and RSS."""
        seen: set[tuple[int, float]] = set()
        result = {name: self._tree(pid, seen) for name, pid in trees.items()}
        for key in set(self._cache) - seen:
            del self._cache[key]
        return result

    def measure_self(self) -> dict[str, Any]:
        """The daemon's own CPU% and RSS."""
        return self._tree(os.getpid(), set(), include_children=False)

    def _tree(
        self, pid: int, seen: set[tuple[int, float]], include_children: bool = True
    ) -> dict[str, Any]:
        pids: list[int] = []
        cpu = 0.0
        rss = 0
        for proc in self._members(pid, include_children):
            with contextlib.suppress(psutil.Error):
                key = (proc.pid, proc.create_time())
                cached = self._cache.setdefault(key, proc)
                seen.add(key)
                cpu += cached.cpu_percent(interval=None)
                rss += cached.memory_info().rss
                pids.append(proc.pid)
        return {
            "pids": pids,
            "processes": len(pids),
            "cpu_percent": cpu,
            "rss_bytes": rss,
        }

    @staticmethod
    def _members(pid: int, include_children: bool) -> list[psutil.Process]:
        try:
            leader = psutil.Process(pid)
        except psutil.Error:
            return []
        if not include_children:
            return [leader]
        with contextlib.suppress(psutil.Error):
            return [leader, *leader.children(recursive=True)]
        return [leader]
