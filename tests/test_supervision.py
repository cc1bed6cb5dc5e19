"""Every way a child fails, injected into real processes, ends where documented."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    Daemon,
    Topo,
    _cleanup,
    group_members,
    http,
    running,
    start_daemon,
    wait_until,
    write_topology,
)

from pdsupervisord.errors import ControlError

pytestmark = pytest.mark.timeout(150)


def state_of(topo: Topo, name: str) -> dict[str, Any]:
    return topo.status()[name]


def wait_state(
    topo: Topo, name: str, *states: str, timeout: float = 30
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        entry = topo.status().get(name)
        return entry if entry and entry["state"] in states else None

    return wait_until(reached, timeout, f"{name} in {states}")  # type: ignore[no-any-return]


def events(topo: Topo) -> list[dict[str, Any]]:
    lines = (topo.tmp / "daemon.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def engine_processes(pgid: int) -> list[int]:
    """Members of an old group plus any process still holding its name."""
    return group_members(pgid)


def replaced_after(topo: Topo, name: str, old_pid: int, what: str) -> dict[str, Any]:
    """Wait until ``name`` is ready again with a pid other than ``old_pid``."""

    def replaced() -> dict[str, Any] | None:
        entry = state_of(topo, name)
        ok = entry["state"] == "ready" and entry["pid"] not in (None, old_pid)
        return entry if ok else None

    return wait_until(replaced, 30, f"{name} back after {what}")  # type: ignore[no-any-return]


def chat(topo: Topo, request_id: str) -> int:
    body = {
        "model": "qwen25vl",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    return http(
        "POST",
        f"{topo.proxy_url}/v1/chat/completions",
        body,
        headers={"X-Request-Id": request_id},
    )[0]


# ----------------------------------------------------------------- no orphans


def test_twenty_sigkills_of_the_prefill_api_server_leave_no_engine(
    tmp_path: Path,
) -> None:
    topo = write_topology(
        tmp_path,
        load=0.1,
        replace={
            "max_restarts = 10": "max_restarts = 100",
            "backoff_max = 1": "backoff_max = 0.2",
        },
    )
    with running(topo) as daemon:
        daemon.wait_ready()
        old_groups = []
        for round_ in range(20):
            pid = wait_state(topo, "prefill-0", "ready")["pid"]
            wait_until(lambda: len(group_members(pid)) >= 2, 10, "engine child")  # noqa: B023
            old_groups.append(pid)
            os.kill(pid, signal.SIGKILL)
            replaced_after(topo, "prefill-0", pid, f"kill {round_ + 1}")
            daemon.remember_groups()
        assert all(engine_processes(g) == [] for g in old_groups)
        assert state_of(topo, "prefill-0")["restarts"] == 20
        assert chat(topo, "after-20-kills") == 200


def test_engine_child_that_left_the_group_is_killed_and_reported(
    tmp_path: Path,
) -> None:
    topo = write_topology(
        tmp_path, extra='[prefill.env]\nPDSD_ENGINE_FAULT = "engine_setsid"\n'
    )
    with running(topo) as daemon:
        status = daemon.wait_ready()
        leader = status["prefill-0"]["pid"]
        escaped = wait_until(
            lambda: [
                p.pid
                for p in psutil.Process(leader).children()
                if os.getsid(p.pid) != os.getsid(leader)
            ],
            10,
            "the engine child's own session",
        )[0]
        state_file = tmp_path / "run" / "state.json"
        wait_until(
            lambda: (
                str(escaped)
                in json.loads(state_file.read_text())["instances"]["prefill-0"][
                    "descendants"
                ]
            ),
            15,
            "the daemon to record the escaped child",
        )
        os.kill(leader, signal.SIGKILL)
        wait_until(
            lambda: (
                not psutil.pid_exists(escaped)
                or psutil.Process(escaped).status() == "zombie"
            ),
            15,
            "escaped child killed",
        )
        reported = wait_until(
            lambda: [
                e
                for e in events(topo)
                if e["event"] == "instance.prefill-0.orphans_killed"
            ],
            15,
            "the orphans_killed event",
        )
        assert escaped in reported[0]["pids"]
        wait_state(topo, "prefill-0", "ready")
        daemon.remember_groups()


def test_restarted_daemon_kills_what_a_sigkilled_one_left(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    first = start_daemon(topo)
    try:
        status = first.wait_ready()
        old = {name: entry["pid"] for name, entry in status.items()}
        trees = {pid: group_members(pid) for pid in old.values()}
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        assert all(group_members(pid) for pid in old.values()), (
            "children survive the daemon"
        )

        second = start_daemon(topo)
        try:
            second.wait_ready()
            for pid, members in trees.items():
                assert group_members(pid) == [], f"leftover group {pid}"
                assert not any(
                    psutil.pid_exists(m) and psutil.Process(m).status() != "zombie"
                    for m in members
                )
            killed = [
                e for e in events(topo) if e["event"] == "daemon.leftovers_killed"
            ]
            assert killed and {k["instance"] for k in killed[0]["killed"]} == set(old)
        finally:
            assert not _cleanup(second)
    finally:
        first.groups.clear()
        _cleanup(first)


def test_second_daemon_on_the_same_topology_is_refused(
    daemon: Daemon, topo: Topo
) -> None:
    daemon.wait_ready()
    second = subprocess.run(
        [sys.executable, "-m", "pdsupervisord.daemon", "-c", str(topo.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    assert f"pid {daemon.process.pid}" in second.stderr
    assert state_of(topo, "prefill-0")["state"] == "ready"  # the first keeps its socket


# ------------------------------------------------------------ start-up deadline


def test_hung_start_is_killed_at_its_deadline(tmp_path: Path) -> None:
    topo = write_topology(
        tmp_path,
        replace={"[prefill]\nstartup_timeout = 30": "[prefill]\nstartup_timeout = 1.5"},
        extra='[prefill.env]\nPDSD_ENGINE_FAULT = "hang_at_start"\n',
    )
    with running(topo) as daemon:
        daemon.wait_ready(("decode-0",))
        first = wait_state(topo, "prefill-0", "starting")["pid"]
        entry = wait_state(topo, "prefill-0", "backoff", timeout=20)
        assert entry["reason"] == "startup_timeout"
        assert group_members(first) == []
        assert state_of(topo, "decode-0")["state"] == "ready"
        proxy = topo.status()["proxy"]  # no P ever ready: the proxy waits
        assert proxy["state"] == "stopped" and proxy["reason"].startswith("waiting")
        assert proxy["pid"] is None


# ---------------------------------------------------------------- probes


def test_frozen_engine_goes_unready_then_back(tmp_path: Path) -> None:
    topo = write_topology(
        tmp_path,
        replace={"liveness_period = 0.5": "liveness_period = 5\ntimeout = 0.5"},
    )
    with running(topo) as daemon:
        status = daemon.wait_ready()
        pid = status["decode-0"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            entry = wait_state(topo, "decode-0", "unready", timeout=15)
            assert entry["reason"] == "readiness_probe_failed" and entry["pid"] == pid
            assert entry["restarts"] == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        entry = wait_state(topo, "decode-0", "ready", timeout=15)
        assert entry["pid"] == pid and entry["restarts"] == 0
        assert chat(topo, "after-unready") == 200


def test_engine_failing_liveness_is_restarted(tmp_path: Path) -> None:
    topo = write_topology(
        tmp_path,
        replace={
            "liveness_period = 0.5": "liveness_period = 0.3\ntimeout = 0.3",
            "stop_timeout = 5": "stop_timeout = 1",
        },
    )
    with running(topo) as daemon:
        pid = daemon.wait_ready()["decode-0"]["pid"]
        os.kill(pid, signal.SIGSTOP)
        entry = wait_until(
            lambda: (
                (e := state_of(topo, "decode-0"))["pid"] not in (None, pid)
                and e["state"] == "ready"
                and e
            ),
            30,
            "decode-0 restarted",
        )
        daemon.remember_groups()
        assert entry["restarts"] == 1
        backoff = [e for e in events(topo) if e["event"] == "instance.decode-0.backoff"]
        assert backoff[0]["reason"] == "liveness_probe_failed"
        assert group_members(pid) == []


# ------------------------------------------------------------- pre-start checks


def test_port_shared_via_so_reuseport_blocks_the_start(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", topo.ports["p0"]))
    squatter.listen()
    with running(topo) as daemon:
        daemon.wait_ready(("decode-0",))
        entry = wait_state(topo, "prefill-0", "backoff")
        assert entry["reason"] == "port_in_use"
        text = entry["last_exit"]["text"]
        assert f"port {topo.ports['p0']} is in use by pid {os.getpid()}" in text
        assert entry["pid"] is None
        squatter.close()
        wait_state(topo, "prefill-0", "ready")
        daemon.wait_ready()


def test_rpc_port_in_use_blocks_the_start(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", topo.ports["rd"]))
        squatter.listen()
        with running(topo) as daemon:
            daemon.wait_ready(("prefill-0",))
            entry = wait_state(topo, "decode-0", "backoff")
            assert entry["reason"] == "port_in_use"
            assert f"port {topo.ports['rd']} is in use" in entry["last_exit"]["text"]


def test_device_held_by_a_leftover_blocks_the_start(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    (tmp_path / "locks").mkdir()
    with open(tmp_path / "locks" / "device-1.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        with running(topo) as daemon:
            daemon.wait_ready(("prefill-0",))
            entry = wait_state(topo, "decode-0", "backoff")
            assert entry["reason"] == "device_busy"
            assert (
                f"device 1 is held by pid {os.getpid()}" in entry["last_exit"]["text"]
            )
            fcntl.flock(held, fcntl.LOCK_UN)
            wait_state(topo, "decode-0", "ready")
            daemon.remember_groups()


# ---------------------------------------------------------------- restart policy


def test_crash_loop_ends_in_fatal_and_reset_clears_it(tmp_path: Path) -> None:
    topo = write_topology(
        tmp_path,
        replace={"max_restarts = 10": "max_restarts = 2"},
        extra='[prefill.env]\nPDSD_ENGINE_FAULT = "crash_at_start"\n',
    )
    with running(topo) as daemon:
        daemon.wait_ready(("decode-0",))
        entry = wait_state(topo, "prefill-0", "fatal")
        assert entry["reason"] == "crash_loop" and entry["restarts"] == 2
        assert entry["last_exit"]["code"] == 1
        fatal = [e for e in events(topo) if e["event"] == "instance.prefill-0.fatal"]
        assert fatal[0]["level"] == "warning"
        assert any("model_load_failed" in line for line in fatal[0]["log_tail"])

        out = topo.ctl("reset", "prefill-0", "--no-wait")
        assert out.returncode == 0, out.stderr
        assert state_of(topo, "prefill-0")["state"] in ("starting", "backoff")
        entry = wait_state(topo, "prefill-0", "fatal")
        assert entry["restarts"] == 4  # a fresh budget of 2 was spent again


def test_never_policy_leaves_a_crash_exited(tmp_path: Path) -> None:
    topo = write_topology(tmp_path, extra='policy = "never"\n')
    with running(topo) as daemon:
        pid = daemon.wait_ready()["decode-0"]["pid"]
        os.kill(pid, signal.SIGKILL)
        entry = wait_state(topo, "decode-0", "exited")
        assert (
            entry["reason"] == "crashed" and entry["last_exit"]["signal"] == "SIGKILL"
        )
        time.sleep(0.5)
        assert state_of(topo, "decode-0")["state"] == "exited"


def test_unrequested_exit_zero_is_restarted_under_on_failure(tmp_path: Path) -> None:
    """vLLM's API server exits 0 when its engine dies (facts §8)."""
    topo = write_topology(
        tmp_path,
        extra='policy = "on-failure"\n',
        replace={
            'PDSD_ENGINE_TOKEN_SECONDS = "0.0"': 'PDSD_ENGINE_TOKEN_SECONDS = "0.0"\n'
            'PDSD_ENGINE_DEATH_EXIT_SECONDS = "0.2"'
        },
    )
    with running(topo) as daemon:
        pid = daemon.wait_ready()["decode-0"]["pid"]
        engine = next(p for p in group_members(pid) if p != pid)
        os.kill(engine, signal.SIGKILL)
        entry = wait_until(
            lambda: (
                (e := state_of(topo, "decode-0"))["state"] == "ready"
                and e["pid"] != pid
                and e
            ),
            30,
            "decode-0 restarted after its engine died",
        )
        daemon.remember_groups()
        assert entry["last_exit"]["code"] == 0
        backoff = [e for e in events(topo) if e["event"] == "instance.decode-0.backoff"]
        assert backoff[0]["reason"] == "crashed"


def test_commanded_stop_is_not_a_crash(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    assert topo.ctl("stop", "decode-0").returncode == 0
    time.sleep(0.5)
    entry = state_of(topo, "decode-0")
    assert entry["state"] == "stopped" and entry["reason"] == "commanded"
    assert entry["restarts"] == 0


# ------------------------------------------------------------------ dependencies


def test_proxy_crash_restarts_only_the_proxy_with_current_membership(
    daemon: Daemon, topo: Topo
) -> None:
    status = daemon.wait_ready()
    os.kill(status["proxy"]["pid"], signal.SIGKILL)
    entry = wait_until(
        lambda: (
            (e := state_of(topo, "proxy"))["state"] == "ready"
            and e["pid"] != status["proxy"]["pid"]
            and e
        ),
        30,
        "proxy back",
    )
    daemon.remember_groups()
    assert entry["restarts"] == 1
    after = topo.status()
    for name in ("prefill-0", "decode-0"):
        assert after[name]["pid"] == status[name]["pid"]
    wait_until(
        lambda: chat(topo, f"after-proxy-{time.monotonic_ns()}") == 200,
        10,
        "proxy routing again",
    )


# ------------------------------------------------------------------------ reload


def test_invalid_topology_on_sighup_changes_nothing(daemon: Daemon, topo: Topo) -> None:
    before = daemon.wait_ready()
    good = topo.path.read_text()
    topo.path.write_text(good.replace("[model]\n", "[model]\ncolour = 1\n"))
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: any(e["event"] == "daemon.reload_failed" for e in events(topo)),
        10,
        "reload_failed event",
    )
    with topo.client() as client, pytest.raises(ControlError) as info:
        client.call("reload")
    assert info.value.code == "invalid_config" and "model.colour" in str(info.value)
    after = topo.status()
    assert {n: e["pid"] for n, e in after.items()} == {
        n: e["pid"] for n, e in before.items()
    }


def test_reload_restarts_only_what_changed(daemon: Daemon, topo: Topo) -> None:
    before = daemon.wait_ready()
    text = topo.path.read_text()
    text = text.replace(
        "[decode]\nstartup_timeout = 30\n",
        '[decode]\nstartup_timeout = 30\nenv = { EXTRA = "1" }\n',
    )
    topo.path.write_text(text)
    out = topo.ctl("reload")
    assert out.returncode == 0, out.stderr
    assert "restart: decode-0" in out.stdout and "prefill-0" in out.stdout
    after = wait_until(
        lambda: (
            (s := topo.status())["decode-0"]["state"] == "ready"
            and s["decode-0"]["pid"] != before["decode-0"]["pid"]
            and s
        ),
        30,
        "decode-0 restarted by reload",
    )
    daemon.remember_groups()
    assert after["prefill-0"]["pid"] == before["prefill-0"]["pid"]
    assert after["proxy"]["pid"] == before["proxy"]["pid"]
    environ = Path(f"/proc/{after['decode-0']['pid']}/environ").read_bytes()
    assert b"EXTRA=1" in environ.split(b"\0")


# ------------------------------------------------------------------ child logs


def test_logs_rotate_by_size_reopen_on_sigusr2_and_tail(tmp_path: Path) -> None:
    topo = write_topology(tmp_path, extra="[logs]\nmax_bytes = 2048\nbackups = 2\n")
    with running(topo) as daemon:
        daemon.wait_ready()
        for n in range(30):
            assert chat(topo, f"fill-{n}") == 200
        log_dir = tmp_path / "log"
        assert (log_dir / "decode-0.log.1").exists()
        assert not (log_dir / "decode-0.log.3").exists()
        assert (log_dir / "decode-0.log").stat().st_size <= 2048

        os.rename(log_dir / "prefill-0.log", log_dir / "prefill-0.log.moved")
        daemon.process.send_signal(signal.SIGUSR2)
        wait_until((log_dir / "prefill-0.log").exists, 10, "reopened log")
        assert chat(topo, "after-reopen") == 200
        wait_until(
            lambda: "after-reopen" in (log_dir / "prefill-0.log").read_text(),
            10,
            "new line in the reopened file",
        )

        out = topo.ctl("tail", "decode-0", "-n", "3")
        assert out.returncode == 0
        assert len(out.stdout.splitlines()) == 3
        assert (
            out.stdout.splitlines()[-1]
            == (log_dir / "decode-0.log").read_text().splitlines()[-1]
        )


# ------------------------------------------------------------------------ systemd


def test_sd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    with open(tmp_path / "daemon.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pdsupervisord.daemon", "-c", str(topo.path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    daemon = Daemon(topo, process)
    try:
        messages: list[str] = []

        def until(needle: str) -> None:
            while not any(needle in m for m in messages):
                messages.append(listener.recv(4096).decode())

        until("READY=1")
        status = daemon.wait_ready()
        assert any("STATUS=1/1 prefill, 1/1 decode" in m for m in messages)
        until("WATCHDOG=1")
        environ = Path(f"/proc/{status['decode-0']['pid']}/environ").read_bytes()
        assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ.split(b"\0"))
        process.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert process.wait(timeout=30) == 0
    finally:
        listener.close()
        assert not _cleanup(daemon)


def test_systemd_unit_is_type_notify_and_verifies(tmp_path: Path) -> None:
    unit = (Path(__file__).parents[1] / "systemd" / "pdsupervisord.service").read_text()
    assert "Type=notify" in unit
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    exe = Path(sys.executable).parent / "pdsupervisord"
    local = tmp_path / "pdsupervisord.service"
    local.write_text(unit.replace("/usr/local/bin/pdsupervisord", str(exe)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in done.stderr.splitlines() if str(local) in line]
    assert done.returncode == 0 and not problems, done.stderr


# ------------------------------------------------------------------------ canary


def test_canary_marks_a_broken_pair_that_health_cannot_see(tmp_path: Path) -> None:
    topo = write_topology(
        tmp_path,
        replace={"liveness_period = 0.5": "liveness_period = 0.5\ncanary_period = 0.3"},
        extra='[prefill.env]\nPDSD_ENGINE_FAULT = "kv_link_down"\n',
    )
    with running(topo) as daemon:
        daemon.wait_ready()

        def broken() -> list[dict[str, Any]]:
            return topo.call("status")["daemon"]["broken_pairs"]  # type: ignore[no-any-return]

        pairs = wait_until(broken, 20, "the canary to find the broken link")
        assert pairs[0]["prefill"] == "prefill-0" and pairs[0]["decode"] == "decode-0"
        assert "HTTP 5" in pairs[0]["error"]
        status = topo.status()
        assert status["prefill-0"]["state"] == "ready"  # /health still says fine
        assert any(e["event"] == "daemon.pair_broken" for e in events(topo))


def test_canary_passes_on_a_healthy_pair(tmp_path: Path) -> None:
    topo = write_topology(
        tmp_path,
        replace={"liveness_period = 0.5": "liveness_period = 0.5\ncanary_period = 0.3"},
    )
    with running(topo) as daemon:
        daemon.wait_ready()
        for name in ("prefill-0", "decode-0"):
            wait_until(
                lambda n=name: "pdsupervisord-canary-" in topo.log(n),
                20,
                f"a canary request on {name}",
            )
        assert topo.call("status")["daemon"]["broken_pairs"] == []
        assert not any(e["event"] == "daemon.pair_broken" for e in events(topo))
