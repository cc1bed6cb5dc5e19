"""The control plane through the real socket and through pdsupervisorctl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq
import zmq.auth
from conftest import (
    Daemon,
    Topo,
    free_ports,
    http,
    running,
    wait_until,
    write_topology,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdsupervisord.client import AsyncClient, Client, CurveKeys, EventStream
from pdsupervisord.errors import ControlError, DaemonUnreachableError

pytestmark = pytest.mark.timeout(180)


def pids(topo: Topo) -> dict[str, tuple[str, int | None]]:
    return {n: (e["state"], e["pid"]) for n, e in topo.status().items()}


# ---------------------------------------------------------------- commands


def test_status_by_name_and_by_role(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    assert [e["name"] for e in topo.call("status", name="decode")["instances"]] == [
        "decode-0"
    ]
    assert topo.call("status", name="proxy")["instances"][0]["role"] == "proxy"
    daemon_info = topo.call("status")["daemon"]
    assert daemon_info["pid"] == daemon.process.pid
    assert daemon_info["summary"] == "1/1 prefill, 1/1 decode, proxy ready"
    with pytest.raises(ControlError) as info:
        topo.call("status", name="gpu")
    assert info.value.code == "unknown_instance"


def test_long_operation_replies_at_once_with_an_op_id(
    daemon: Daemon, topo: Topo
) -> None:
    daemon.wait_ready()
    with EventStream(topo.endpoint.replace("control", "events"), "daemon.op_") as ev:
        time.sleep(0.3)  # the subscription must reach the daemon first
        started = time.monotonic()
        reply = topo.call("restart", name="decode-0")
        assert time.monotonic() - started < 2
        assert reply["op"].startswith("op-")
        assert reply["instances"][0]["state"] == "stopping"

        finished = None
        while finished is None:
            event = ev.next(timeout=30)
            assert event is not None, "no op_finished event"
            if event["topic"] == "daemon.op_finished" and event["op"] == reply["op"]:
                finished = event
        assert finished["ok"] is True
        assert finished["result"]["instances"][0]["state"] == "ready"
    daemon.remember_groups()


def test_role_target_restarts_every_instance_of_the_role(
    daemon: Daemon, topo: Topo
) -> None:
    daemon.wait_ready()
    assert topo.ctl("scale", "prefill", "2").returncode == 0
    before = topo.status()
    out = topo.ctl("restart", "prefill")
    assert out.returncode == 0, out.stderr
    after = topo.status()
    daemon.remember_groups()
    for name in ("prefill-0", "prefill-1"):
        assert after[name]["state"] == "ready"
        assert after[name]["pid"] != before[name]["pid"]
    assert after["decode-0"]["pid"] == before["decode-0"]["pid"]


def test_concurrent_scale_and_restart_on_different_instances_both_complete(
    daemon: Daemon, topo: Topo
) -> None:
    daemon.wait_ready()
    before = topo.status()
    results: dict[str, Any] = {}

    def run(key: str, command: str, **args: Any) -> None:
        with Client(topo.endpoint, timeout=60) as client:
            results[key] = client.call(command, **args)

    threads = [
        threading.Thread(
            target=run,
            args=("scale", "scale"),
            kwargs={"role": "prefill", "count": 2, "wait": 30},
        ),
        threading.Thread(
            target=run,
            args=("restart", "restart"),
            kwargs={"name": "decode-0", "wait": 30},
        ),
    ]
    for thread in threads:
        thread.start()
    status_started = time.monotonic()
    assert topo.status()["prefill-0"]["state"] == "ready"  # status answers meanwhile
    assert time.monotonic() - status_started < 2
    for thread in threads:
        thread.join(timeout=90)
    daemon.remember_groups()

    assert results["scale"]["added"] == ["prefill-1"]
    assert results["restart"]["instances"][0]["state"] == "ready"
    after = topo.status()
    assert after["prefill-1"]["state"] == "ready"
    assert after["decode-0"]["pid"] != before["decode-0"]["pid"]


def test_stats_config_version_wait(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    topo.call("stats")  # the first call only primes the CPU counters
    time.sleep(0.2)
    stats = {e["name"]: e for e in topo.call("stats")["instances"]}
    assert stats["decode-0"]["processes"] >= 2  # API server and engine child
    assert stats["decode-0"]["rss_bytes"] > 10_000_000
    assert stats["decode-0"]["pids"][0] == topo.status()["decode-0"]["pid"]

    config = topo.call("config")
    assert config["source"] == str(topo.path)
    assert config["topology"]["proxy"]["port"] == topo.ports["proxy"]
    names = [i["name"] for i in config["plan"]["instances"]]
    assert names == ["prefill-0", "decode-0", "proxy"]

    assert topo.call("version")["protocol"] == 1
    assert (
        topo.call("wait", name="decode-0", state="ready", timeout=1)["state"] == "ready"
    )
    with pytest.raises(ControlError) as info:
        topo.call("wait", name="decode-0", state="stopped", timeout=0.3)
    assert info.value.code == "timeout"
    with pytest.raises(ControlError) as info:
        topo.call("wait", name="decode-0", state="sleeping", timeout=1)
    assert info.value.code == "bad_args"


def test_ctl_covers_every_command(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    for args in (
        ["version"],
        ["config"],
        ["stats"],
        ["status", "--json"],
        ["--json", "stats", "decode"],
        ["wait", "proxy", "ready"],
        ["tail", "decode-0", "-n", "2"],
        ["reload"],
    ):
        out = topo.ctl(*args)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stdout.strip(), args
    assert json.loads(topo.ctl("--json", "version").stdout)["protocol"] == 1
    assert "CPU%" in topo.ctl("stats").stdout
    assert topo.ctl("wait", "proxy", "fatal", "--timeout", "0.2").returncode == 1

    events = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdsupervisord.ctl",
            "-c",
            str(topo.path),
            "--json",
            "events",
            "decode-0",
            "--count",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    assert topo.ctl("restart", "decode-0").returncode == 0
    out, _ = events.communicate(timeout=30)
    seen = [json.loads(line) for line in out.splitlines()]
    assert [e["topic"] for e in seen] == [
        "instance.decode-0.stopping",
        "instance.decode-0.stopped",
    ]
    assert seen[1]["seq"] > seen[0]["seq"]
    daemon.remember_groups()

    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdsupervisord.ctl",
            "-c",
            str(topo.path),
            "tail",
            "-f",
            "prefill-0",
            "-n",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        body = {"model": "qwen25vl", "prompt": "hi", "max_tokens": 2}
        http(
            "POST",
            f"{topo.proxy_url}/v1/completions",
            body,
            headers={"X-Request-Id": "followed-1"},
        )
        assert follow.stdout is not None
        line = ""
        deadline = time.monotonic() + 20
        while "followed-1" not in line and time.monotonic() < deadline:
            line = follow.stdout.readline()
        assert "followed-1" in line
    finally:
        follow.terminate()
        follow.wait(timeout=10)


def test_async_client(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()

    async def main() -> list[str]:
        async with AsyncClient(topo.endpoint, timeout=10) as client:
            status = await client.call("status")
            with pytest.raises(ControlError):
                await client.call("stop", name="nobody")
            return [e["name"] for e in status["instances"]]

    assert anyio.run(main) == ["prefill-0", "decode-0", "proxy"]

    async def unreachable() -> None:
        async with AsyncClient(f"ipc://{topo.tmp}/nothing.sock", timeout=0.3) as c:
            await c.call("status")

    with pytest.raises(DaemonUnreachableError):
        anyio.run(unreachable)


# ------------------------------------------------------------------ safety


def test_tcp_endpoint_without_curve_is_refused_at_start(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    topo = write_topology(
        tmp_path,
        replace={
            "stop_timeout = 5": f'stop_timeout = 5\ncontrol = "tcp://0.0.0.0:{port}"'
        },
    )
    done = subprocess.run(
        [sys.executable, "-m", "pdsupervisord.daemon", "-c", str(topo.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2  # refused at load: the topology is invalid
    assert "daemon.control: tcp://0.0.0.0" in done.stderr
    assert "has no authentication" in done.stderr
    assert not (tmp_path / "log" / "prefill-0.log").exists()  # nothing started


def test_tcp_loopback_needs_the_explicit_opt_in(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    endpoint = f"tcp://127.0.0.1:{port}"
    line = f'stop_timeout = 5\ncontrol = "{endpoint}"'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    refused = write_topology(tmp_path / "a", replace={"stop_timeout = 5": line})
    done = subprocess.run(
        [sys.executable, "-m", "pdsupervisord.daemon", "-c", str(refused.path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "allow_tcp_loopback" in done.stderr

    topo = write_topology(
        tmp_path / "b",
        replace={"stop_timeout = 5": line + "\nallow_tcp_loopback = true"},
    )
    topo.endpoint = endpoint
    with running(topo) as daemon:
        daemon.wait_ready()


def test_curve_tcp_endpoint_admits_only_listed_clients(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    os.rename(client_public, allowed / "client.key")
    port, events_port = free_ports(2)
    topo = write_topology(
        tmp_path,
        replace={
            "stop_timeout = 5": (
                f'stop_timeout = 5\ncontrol = "tcp://127.0.0.1:{port}"\n'
                f'events = "tcp://127.0.0.1:{events_port}"\n'
                f'curve_secret_key = "{server_secret}"\n'
                f'curve_authorized_keys = "{allowed}"'
            )
        },
    )
    topo.endpoint = f"tcp://127.0.0.1:{port}"
    with running(topo) as daemon:
        curve = CurveKeys.load(server_public, client_secret)
        with Client(topo.endpoint, timeout=30, curve=curve) as client:
            wait_until(
                lambda: client.call("version")["protocol"] == 1, 30, "curve call"
            )
        daemon.process.poll()

        def ready() -> bool:
            with Client(topo.endpoint, timeout=5, curve=curve) as client:
                states = {e["state"] for e in client.call("status")["instances"]}
                return states == {"ready"} and len(states) == 1

        wait_until(ready, 30, "topology ready over curve")
        with Client(topo.endpoint, timeout=5, curve=curve) as client:
            daemon.groups.update(e["pid"] for e in client.call("status")["instances"])

        stranger = CurveKeys.load(server_public, stranger_secret)
        with (
            Client(topo.endpoint, timeout=1, curve=stranger) as client,
            pytest.raises(DaemonUnreachableError),
        ):
            client.call("version")
        with (
            Client(topo.endpoint, timeout=1) as plain,
            pytest.raises(DaemonUnreachableError),
        ):
            plain.call("version")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pdsupervisord.ctl",
                "-s",
                topo.endpoint,
                "--curve-server-key",
                str(server_public),
                "--curve-client-key",
                str(client_secret),
                "version",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        daemon.process.terminate()
        daemon.process.wait(timeout=30)


def test_socket_files_are_private(daemon: Daemon, topo: Topo) -> None:
    daemon.wait_ready()
    for name in ("control.sock", "events.sock"):
        mode = (topo.tmp / "run" / name).stat().st_mode & 0o777
        assert mode == 0o600, name


_frame = st.one_of(
    st.binary(max_size=256),
    st.text(max_size=64).map(str.encode),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=16),
        lambda kids: (
            st.lists(kids, max_size=4)
            | st.dictionaries(st.text(max_size=8), kids, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "id": st.integers() | st.text(max_size=8) | st.none(),
            "command": st.sampled_from(
                [
                    "status",
                    "stop",
                    "start",
                    "restart",
                    "reset",
                    "scale",
                    "tail",
                    "wait",
                    "stats",
                    "nope",
                    "",
                    "reload",
                ]
            )
            | st.integers(),
            "args": st.dictionaries(
                st.sampled_from(
                    [
                        "name",
                        "role",
                        "count",
                        "wait",
                        "lines",
                        "state",
                        "timeout",
                        "offset",
                        "x",
                    ]
                ),
                st.none()
                | st.integers(-5, 10**12)
                | st.text(max_size=12)
                | st.floats(allow_nan=False)
                | st.lists(st.integers(), max_size=3),
                max_size=4,
            )
            | st.integers()
            | st.text(max_size=5),
        },
    ).map(lambda v: json.dumps(v).encode()),
)


def test_fuzzed_requests_never_crash_or_change_the_daemon(tmp_path: Path) -> None:
    topo = write_topology(tmp_path)
    with running(topo) as daemon:
        daemon.wait_ready()
        before = pids(topo)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(topo.endpoint)
        sent = 0

        @settings(
            max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck)
        )
        @given(frames=st.lists(_frame, min_size=1, max_size=5))
        def hammer(frames: list[bytes]) -> None:
            nonlocal sent
            payload = json.loads(frames[-1]) if _is_json(frames[-1]) else None
            if (
                isinstance(payload, dict)
                and payload.get("command")
                in ("stop", "start", "restart", "reset", "scale", "reload")
                and isinstance(payload.get("args"), dict)
                and payload["args"].get("name", payload["args"].get("role"))
                in ("prefill-0", "decode-0", "proxy", "prefill", "decode")
            ):
                return  # a valid state-changing command is not garbage
            sock.send_multipart([b"", *frames])
            sent += 1
            # The daemon answers [identity, envelope..., payload] of 2-4 frames.
            routable = len(frames) <= 2
            if routable and sock.poll(200):
                reply = json.loads(sock.recv_multipart()[-1])
                assert isinstance(reply, dict) and "ok" in reply

        hammer()
        # An oversized frame: ZeroMQ drops the connection, the daemon lives on.
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(topo.endpoint)
        big.send_multipart([b"", b"x" * (1 << 20)])
        big.close()
        sock.close()

        assert sent > 1000
        assert daemon.process.poll() is None
        assert pids(topo) == before
        assert topo.call("status")["daemon"]["summary"] == (
            "1/1 prefill, 1/1 decode, proxy ready"
        )


def _is_json(frame: bytes) -> bool:
    try:
        json.loads(frame)
    except ValueError:
        return False
    return True
