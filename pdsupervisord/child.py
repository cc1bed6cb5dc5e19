"""One child process's life at the OS level: spawn, log files, kill, verify.

Knows nothing about ZeroMQ, the proxy or restart policies.

Design note on killing: a ``vllm serve`` API server spawns ``EngineCore`` and
workers that hold device memory; when the API server dies they live on as
orphans (facts §5/§8). So every child starts in a new session (its own process
group), and every stop or death ends with the whole group being killed and
checked empty. Descendants that moved to another group or session are found
with psutil from a snapshot taken while the tree was alive, and killed too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio
import anyio.abc
import psutil
import structlog

from pdsupervisord.states import ExitStatus

__all__ = ["Child", "child_environment", "descendants_of", "spawn"]

#: Seconds a stopped leader's descendants get to exit on their own. A guess
#: from vLLM 0.32 on CPU, whose resource tracker outlives its API server by
#: well under a second after SIGTERM.
TREE_GRACE = 2.0

log = structlog.get_logger("pdsupervisord.child")

#: Variables the daemon must not hand down: a child that inherited
#: NOTIFY_SOCKET could tell systemd it is ready or stopping on our behalf.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment minus systemd's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(extra)
    return env


@dataclass
class Child:
    """A spawned process that leads its own process group.

    Attributes:
        name: Instance name, for logs.
        process: The anyio process handle.
        started_at: Monotonic time of the spawn.
        known: Descendants seen so far (pid -> create time), so that processes
            which left the group can still be found and killed.
    """

    name: str
    process: anyio.abc.Process
    started_at: float
    wall_started_at: float
    known: dict[int, float] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group id."""
        return self.process.pid

    async def wait(self) -> ExitStatus:
        """Block until the leader exits; return how it ended."""
        returncode = await self.process.wait()
        return ExitStatus.from_returncode(returncode)

    def snapshot_descendants(self) -> None:
        """Remember the leader's current descendants (scans every process)."""
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.known[proc.pid] = proc.create_time()

    def remember(self, descendants: dict[int, float]) -> bool:
        """Add descendants found by a shared scan; True when any was new."""
        new = {p: t for p, t in descendants.items() if self.known.get(p) != t}
        self.known.update(new)
        return bool(new)

    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the whole group; False when the group is gone."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    async def stop(self, grace: float) -> list[int]:
        """SIGTERM the group, wait ``grace`` seconds, SIGKILL, verify.

        Returns:
            The pids that had to be killed after the leader exited (orphans).
        """
        self.snapshot_descendants()
        started = time.monotonic()
        if self.process.returncode is None:
            self.signal_group(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await self.process.wait()
        # Helpers (vLLM's multiprocessing resource tracker) exit a moment
        # after their leader on a clean stop: give them the rest of the grace
        # (at most TREE_GRACE) before calling them orphans.
        left = min(TREE_GRACE, max(0.0, grace - (time.monotonic() - started)))
        with anyio.move_on_after(left):
            while await anyio.to_thread.run_sync(self._survivors):
                await anyio.sleep(0.05)
        return await self.reap_group()

    async def reap_group(self, deadline: float = 5.0) -> list[int]:
        """Kill whatever is left of the tree after the leader is gone or late.

        Returns:
            Pids of survivors that were killed (empty when the tree was clean).
        """
        survivors = await anyio.to_thread.run_sync(self._survivors)
        self.signal_group(signal.SIGKILL)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process.returncode is None:
            await self.process.wait()
        await self._wait_group_empty(deadline)
        return sorted(p for p in survivors if p != self.pid)

    def _survivors(self) -> list[int]:
        """Live processes of the tree: the group plus remembered descendants."""
        alive: set[int] = set()
        for pid, created in self.known.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != "zombie":
                    alive.add(pid)
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return sorted(alive)  # no member left, not even a zombie: skip the scan
        except PermissionError:
            pass
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == self.pid and proc.status() != "zombie":
                    alive.add(proc.pid)
        return sorted(alive)

    async def _wait_group_empty(self, deadline: float) -> None:
        """Poll until no process is left in the group (reaping is init's job)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if not await anyio.to_thread.run_sync(self._survivors):
                return
            await anyio.sleep(0.005)
        log.warning("child.group_not_empty", instance=self.name, pgid=self.pid)


async def spawn(
    name: str,
    argv: tuple[str, ...],
    env: Mapping[str, str],
    cpus: tuple[int, ...] = (),
) -> Child:
    """Start ``argv`` in a new session, its stdout and stderr on pipes.

    The caller pumps ``child.process.stdout``/``stderr`` into the log. With
    ``cpus``, the process is pinned to those cores right after the spawn;
    processes and threads it creates later inherit the mask (a thread started
    in the first instants of the exec could escape it: none does in vLLM).

    Raises:
        OSError: when the program cannot be executed (missing, not
            executable) or a CPU in ``cpus`` does not exist.
    """
    process = await anyio.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_environment(env),
        start_new_session=True,
    )
    if cpus:
        try:
            os.sched_setaffinity(process.pid, cpus)
        except ProcessLookupError:
            pass  # already gone: the exit watcher will report it
        except OSError:
            # No such CPU here: do not leave an unpinned process running.
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise
    return Child(name, process, time.monotonic(), time.time())


def descendants_of(leaders: dict[str, int]) -> dict[str, dict[int, float]]:
    """Every descendant (pid -> start time) of each leader, from one scan.

    Blocking (reads /proc once): call it in a worker thread.
    """
    children: dict[int, list[tuple[int, float]]] = {}
    for proc in psutil.process_iter(["pid", "ppid", "create_time"]):
        info = proc.info
        if info["ppid"] is not None and info["create_time"] is not None:
            children.setdefault(info["ppid"], []).append(
                (info["pid"], info["create_time"])
            )
    found: dict[str, dict[int, float]] = {}
    for name, leader in leaders.items():
        tree: dict[int, float] = {}
        stack = [leader]
        while stack:
            for pid, created in children.get(stack.pop(), []):
                if pid not in tree:
                    tree[pid] = created
                    stack.append(pid)
        found[name] = tree
    return found
