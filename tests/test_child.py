"""Process-tree helpers of pdsupervisord.child, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from pdsupervisord.child import descendants_of

GRANDCHILD = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
    "time.sleep(30)"
)


def test_one_scan_finds_every_descendant_of_each_leader() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", GRANDCHILD], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = descendants_of({"a": leader.pid, "self": os.getpid()})
            if len(found["a"]) == 1:
                break
            time.sleep(0.05)
        ((grandchild, created),) = found["a"].items()
        assert psutil.Process(grandchild).ppid() == leader.pid
        assert created == psutil.Process(grandchild).create_time()
        assert leader.pid in found["self"] and grandchild in found["self"]
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(timeout=10)
