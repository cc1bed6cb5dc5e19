"""The daemon's state file: which processes it started, to clean up after a crash.

``<run_dir>/state.json`` lists, per instance, the leader pid (also its
process group id), its start time and every descendant seen, each with its
start time. A daemon that starts and finds a state file left by a dead
predecessor kills whatever of those processes still runs (matching pid *and*
start time, so a recycled pid is never touched) before starting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = ["StateFile", "kill_leftovers"]


@dataclass
class StateFile:
    """Writes the current process table atomically on every change."""

    path: Path
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, name: str, pid: int, known: dict[int, float]) -> None:
        """Remember ``name``'s leader and descendants (pid -> create time)."""
        entry = {
            "pid": pid,
            "pgid": pid,
            "create_time": _create_time(pid),
            "descendants": {str(p): t for p, t in known.items()},
        }
        if self.instances.get(name) != entry:
            self.instances[name] = entry
            self.save()

    def forget(self, name: str) -> None:
        """Drop ``name`` once its whole tree is verified gone."""
        if self.instances.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        """Write atomically (temp file + rename)."""
        body = {"daemon_pid": os.getpid(), "instances": self.instances}
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps(body, indent=1))
        os.replace(temp, self.path)

    def remove(self) -> None:
        """Delete the file after a clean shutdown."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _create_time(pid: int) -> float | None:
    with contextlib.suppress(psutil.Error):
        return float(psutil.Process(pid).create_time())
    return None


def kill_leftovers(path: Path) -> list[dict[str, Any]]:
    """Kill every process of a dead daemon's state file; return what was killed.

    Processes are matched by pid and start time; groups are killed whole.
    The file is removed afterwards.
    """
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError:
        path.unlink()
        return []

    killed = []
    for name, entry in state.get("instances", {}).items():
        candidates = {int(entry["pid"]): entry.get("create_time")}
        candidates.update({int(p): t for p, t in entry.get("descendants", {}).items()})
        pids = [pid for pid, created in candidates.items() if _alive(pid, created)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if _alive(int(entry["pid"]), entry.get("create_time")) or pids:
                os.killpg(int(entry["pgid"]), signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            killed.append({"instance": name, "pids": sorted(pids)})
    path.unlink()
    return killed


def _alive(pid: int, created: float | None) -> bool:
    """Alive and the same process (not a recycled pid)."""
    try:
        proc = psutil.Process(pid)
        same = created is None or abs(proc.create_time() - created) < 0.01
        return bool(same and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
