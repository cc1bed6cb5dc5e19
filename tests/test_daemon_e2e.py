"""End to end: the daemon runs a real 1P1D topology of stand-in engines."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import (
    Daemon,
    Topo,
    _cleanup,
    group_members,
    http,
    start_daemon,
    wait_until,
    write_topology,
)

from pdsupervisord.errors import ControlError

pytestmark = pytest.mark.timeout(120)

GUIDE_REQUEST: dict[str, Any] = {
    "model": "qwen25vl",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.invalid/q.png"},
                },
                {"type": "text", "text": "What is the text in the illustrate?"},
            ],
        },
    ],
    "max_tokens": 100,
    "temperature": 0,
}


def chat(topo: Topo, request_id: str, **extra: Any) -> tuple[int, bytes]:
    return http(
        "POST",
        f"{topo.proxy_url}/v1/chat/completions",
        {**GUIDE_REQUEST, **extra},
        headers={"X-Request-Id": request_id},
    )


def test_guide_request_through_the_proxy(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()

    status, body = chat(topo, "guide-plain-1")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["completion_tokens"] > 0

    status, body = chat(topo, "guide-stream-1", stream=True)
    assert status == 200
    events = [line for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert any('"delta"' in e for e in events[:-1])

    for request_id in ("guide-plain-1", "guide-stream-1"):
        assert request_id in topo.log("prefill-0")
        assert request_id in topo.log("decode-0")


def test_status_lists_every_instance_with_its_facts(daemon: Daemon, topo: Topo) -> None:
    status = daemon.wait_ready()
    assert list(status) == ["prefill-0", "decode-0", "proxy"]
    prefill = status["prefill-0"]
    assert prefill["role"] == "prefill"
    assert prefill["port"] == topo.ports["p0"] and prefill["devices"] == [0]
    assert prefill["pid"] > 0 and prefill["restarts"] == 0
    assert prefill["uptime"] >= 0 and prefill["last_exit"] is None

    table = topo.ctl("status")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ROLE", "STATE", "PID"]
    assert [line.split()[2] for line in lines[1:]] == ["ready"] * 3
    as_json = json.loads(topo.ctl("status", "--json").stdout)
    assert [e["name"] for e in as_json["instances"]] == list(status)


def test_control_socket_is_private(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    mode = stat.S_IMODE(os.stat(topo.endpoint.removeprefix("ipc://")).st_mode)
    assert mode == 0o600


def test_scale_prefill_up_then_down_under_load(tmp_path: Path) -> None:
    # Slow tokens keep requests in flight while prefill-1 is drained.
    topo = write_topology(tmp_path, token=0.01)
    daemon = start_daemon(topo)
    try:
        daemon.wait_ready()
        scaled = topo.ctl("scale", "prefill", "2")
        assert scaled.returncode == 0, scaled.stderr
        assert "prefill-1" in scaled.stdout
        daemon.wait_ready(("prefill-0", "prefill-1", "decode-0", "proxy"))

        def reached_prefill_1() -> bool:
            request_id = f"to-p1-{time.monotonic_ns()}"
            assert chat(topo, request_id, max_tokens=2)[0] == 200
            return request_id in topo.log("prefill-1")

        wait_until(reached_prefill_1, 30, "a request routed to prefill-1")

        results: list[int] = []
        stop = threading.Event()

        def loop(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                results.append(chat(topo, f"loop-{worker}-{n}", max_tokens=20)[0])

        threads = [threading.Thread(target=loop, args=(w,)) for w in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        down = topo.ctl("scale", "prefill", "1")
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

        assert down.returncode == 0, down.stderr
        assert "removed: prefill-1" in down.stdout
        assert results and set(results) == {200}, results
        assert "prefill-1" not in topo.status()
        assert daemon.terminate() == 0
    finally:
        assert not _cleanup(daemon)


def test_sigkill_of_decode_is_repaired_without_orphans(
    daemon: Daemon, topo: Topo
) -> None:
    status = daemon.wait_ready()
    old_pid = status["decode-0"]["pid"]
    members = wait_until(
        lambda: [p for p in group_members(old_pid) if p != old_pid],
        10,
        "decode-0's engine child",
    )
    assert members, "the stand-in engine must run an engine child process"

    os.kill(old_pid, signal.SIGKILL)

    def repaired() -> dict[str, Any] | None:
        entry = topo.status()["decode-0"]
        return entry if entry["state"] == "ready" and entry["pid"] != old_pid else None

    entry = wait_until(repaired, 30, "decode-0 ready again")
    daemon.remember_groups()
    assert entry["restarts"] == 1
    assert entry["last_exit"]["signal"] == "SIGKILL"
    assert group_members(old_pid) == []
    status_code, _ = chat(topo, "after-repair")
    assert status_code == 200


def test_sigterm_stops_everything_and_exits_zero(daemon: Daemon, topo: Topo) -> None:
    status = daemon.wait_ready()
    groups = [entry["pid"] for entry in status.values()]
    assert daemon.terminate() == 0
    for pgid in groups:
        assert group_members(pgid) == [], f"group {pgid} survived"
    assert not Path(topo.endpoint.removeprefix("ipc://")).exists()


def test_stop_and_start_commands(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    old = topo.status()["prefill-0"]["pid"]
    stopped = topo.ctl("stop", "prefill-0")
    assert stopped.returncode == 0, stopped.stderr
    entry = topo.status()["prefill-0"]
    assert entry["state"] == "stopped" and entry["pid"] is None
    assert group_members(old) == []
    time.sleep(0.3)
    assert topo.status()["prefill-0"]["state"] == "stopped"  # never restarted

    started = topo.ctl("start", "prefill-0")
    assert started.returncode == 0, started.stderr
    assert topo.status()["prefill-0"]["state"] == "ready"
    daemon.remember_groups()

    restarted = topo.ctl("restart", "decode-0")
    assert restarted.returncode == 0
    assert topo.status()["decode-0"]["state"] == "ready"
    daemon.remember_groups()
    assert chat(topo, "after-restart")[0] == 200


def test_bad_requests_get_errors_and_change_nothing(daemon: Daemon, topo: Topo) -> None:
    before = daemon.wait_ready()

    out = topo.ctl("scale", "prefill", "9")
    assert out.returncode == 1 and "within 1..3" in out.stderr
    out = topo.ctl("stop", "prefill-7")
    assert out.returncode == 1 and "unknown_instance" in out.stderr
    with topo.client() as client:
        for bad in (
            {"role": "prefill"},
            {"role": "prefill", "count": "2"},
            {"role": "gpu", "count": 1},
        ):
            with pytest.raises(ControlError) as info:
                client.call("scale", **bad)
            assert info.value.code == "bad_args"
        with pytest.raises(ControlError) as info:
            client.call("launch-missiles")
        assert info.value.code == "unknown_command"

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(topo.endpoint)
    for garbage in (b"", b"{", b"[1,2]", b'{"command": 5}', b"\xff\xfe"):
        sock.send_multipart([b"", garbage])
        assert sock.poll(5000)
        reply = json.loads(sock.recv_multipart()[-1])
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    sock.close()

    after = topo.status()
    assert {n: (e["state"], e["pid"]) for n, e in after.items()} == {
        n: (e["state"], e["pid"]) for n, e in before.items()
    }


def test_ctl_reports_unreachable_daemon(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    started = time.monotonic()
    out = topo.ctl("--timeout", "0.5", "status")
    assert out.returncode == 3
    assert "unreachable" in out.stderr
    assert time.monotonic() - started < 15


def test_shutdown_command_stops_the_daemon(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    out = topo.ctl("shutdown")
    assert out.returncode == 0
    assert daemon.process.wait(timeout=30) == 0


def test_instance_cpus_pin_the_process_tree(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    text = topo.path.read_text().replace(
        "devices = [1]\n", "devices = [1]\ncpus = [0]\n"
    )
    topo.path.write_text(text)
    daemon = start_daemon(topo)
    try:
        status = daemon.wait_ready()
        pid = status["decode-0"]["pid"]
        tree = [pid, *[p for p in group_members(pid) if p != pid]]
        assert len(tree) >= 2
        assert all(os.sched_getaffinity(p) == {0} for p in tree)
        assert len(os.sched_getaffinity(status["prefill-0"]["pid"])) == os.cpu_count()
    finally:
        assert not _cleanup(daemon)


def test_ctl_fails_fast_when_no_daemon_runs_even_for_long_commands(
    tmp_path: Path,
) -> None:
    topo = write_topology(tmp_path)
    started = time.monotonic()
    out = topo.ctl("--timeout", "1", "scale", "prefill", "2")
    assert out.returncode == 3
    assert "control.sock does not exist" in out.stderr
    assert "is pdsupervisord running?" in out.stderr
    assert time.monotonic() - started < 10

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "control.sock").touch()  # a stale file, nobody behind it
    out = topo.ctl("--timeout", "1", "stop", "decode-0")
    assert out.returncode == 3 and "no answer" in out.stderr


def test_scale_down_removes_a_stopped_instance_before_a_serving_one(
    daemon: Daemon, topo: Topo
) -> None:
    daemon.wait_ready()
    assert topo.ctl("scale", "prefill", "2").returncode == 0
    daemon.remember_groups()
    assert topo.ctl("stop", "prefill-0").returncode == 0
    out = topo.ctl("scale", "prefill", "1")
    assert out.returncode == 0 and "removed: prefill-0" in out.stdout
    status = topo.status()
    assert "prefill-0" not in status and status["prefill-1"]["state"] == "ready"
    assert chat(topo, "one-prefill-left")[0] == 200


def test_malicious_json_cannot_kill_the_daemon(daemon: Daemon, topo: Topo) -> None:
    before = daemon.wait_ready()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(topo.endpoint)
    deep = b"[" * 30000 + b"]" * 30000
    nested_args = (
        b'{"command": "status", "args": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001
    )
    for payload in (deep, nested_args, b'{"id": Infinity, "command": "version"}'):
        sock.send_multipart([b"", payload])
        assert sock.poll(5000)
        reply = json.loads(sock.recv_multipart()[-1])  # strict JSON back
        assert isinstance(reply, dict)
    sock.close()
    assert daemon.process.poll() is None
    assert {n: e["pid"] for n, e in topo.status().items()} == {
        n: e["pid"] for n, e in before.items()
    }
