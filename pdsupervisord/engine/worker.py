"""The engine child's worker: the stand-in's ``VLLM::Worker``.

Real vLLM runs the model in a third process, ``VLLM::Worker``, a child of
``VLLM::EngineCore`` in the same process group. Measured on vLLM 0.32: it
survives a SIGKILLed API server (with its EngineCore, until killed), and
exits by itself about 4 s after its own EngineCore is SIGKILLed. This process
only gives the stand-in's tree that shape: it holds nothing, exits 0 on
SIGTERM or SIGINT, and exits 0 within half a second of its parent's death. It
imports nothing heavy, since every stand-in engine starts one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

__all__ = ["PROCESS_NAME", "main"]

#: What ``/proc/<pid>/comm`` shows, as for the real process.
PROCESS_NAME = "VLLM::Worker"

#: How often the worker checks that its parent is alive (re-parented to init
#: or a subreaper once it is not).
PARENT_POLL_SECONDS = 0.5


def main(argv: list[str] | None = None) -> int:
    """Wait for SIGTERM, SIGINT or the parent's death; return 0.

    Args:
        argv: ``[PARENT_PID]``: the engine child's pid, given by it so that a
            parent which died before this line ran is noticed too.
    """
    args = sys.argv[1:] if argv is None else argv
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    parent = int(args[0]) if args else os.getppid()
    # Best effort, as for the engine child: the name is for people and tools.
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(PROCESS_NAME)
    while signal.sigtimedwait(stop, PARENT_POLL_SECONDS) is None:
        if os.getppid() != parent:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
