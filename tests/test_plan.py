"""The plan reproduces the seed guide's commands token for token."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdsupervisord import config, plan

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "tests" / "data" / "seed-pd-llmdatadist-qwen25vl.md"
SHARED_GUIDE = ROOT.parent / "shared" / "reference" / GUIDE.name


def _shell_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    match = re.compile(r"```(?:shell|bash)\n(.*?)```", re.S).search(text, start)
    assert match, f"no shell block after {marker!r}"
    return match[1]


def _parse_block(block: str) -> tuple[dict[str, str], list[str]]:
    """Exports and the one command of a guide block, as a shell would see them."""
    tokens = iter(shlex.split(block.replace("\\\n", " "), comments=True))
    env: dict[str, str] = {}
    argv: list[str] = []
    for token in tokens:
        if token == "export":
            name, _, value = next(tokens).partition("=")
            env[name] = value
        else:
            argv.append(token)
    return env, argv


def _guide() -> dict[str, Any]:
    text = GUIDE.read_text()
    prefill = _parse_block(_shell_block_after(text, "{tab-item} Prefiller"))
    decode = _parse_block(_shell_block_after(text, "{tab-item} Decoder"))
    _, proxy = _parse_block(_shell_block_after(text, "## Example Proxy"))
    return {"prefill": prefill, "decode": decode, "proxy": proxy}


def _plan_json(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdsupervisord.daemon",
            "-c",
            str(path),
            "--print-plan",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return {i["name"]: i for i in json.loads(out)["instances"]}


def _split_kv(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    at = argv.index("--kv-transfer-config")
    return argv[:at] + argv[at + 2 :], json.loads(argv[at + 1])


def assert_same_command(planned: list[str], guide: list[str]) -> None:
    planned_rest, planned_kv = _split_kv(planned)
    guide_rest, guide_kv = _split_kv(guide)
    assert planned_rest == guide_rest
    assert planned_kv == guide_kv


def test_vendored_guide_matches_shared_copy() -> None:
    if not SHARED_GUIDE.exists():
        pytest.skip("no ../shared checkout beside this clone")
    assert GUIDE.read_text() == SHARED_GUIDE.read_text()


def test_1p1d_plan_is_the_guide() -> None:
    guide = _guide()
    planned = _plan_json(ROOT / "conf" / "qwen25vl-1p1d.toml")

    assert list(planned) == ["prefill-0", "decode-0", "proxy"]
    for name, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        env, argv = guide[role]
        assert planned[name]["role"] == role
        assert planned[name]["env"] == env
        assert_same_command(planned[name]["argv"], argv)
    assert planned["proxy"]["argv"] == guide["proxy"]
    assert planned["proxy"]["role"] == "proxy"


def test_2p1d_plan_follows_the_guide_variation() -> None:
    """The guide: 'set ASCEND_RT_VISIBLE_DEVICES, VLLM_ASCEND_LLMDD_RPC_PORT and
    port to different values for each P process'; decode moves to device 2."""
    guide = _guide()
    planned = _plan_json(ROOT / "conf" / "qwen25vl-2p1d.toml")
    assert list(planned) == ["prefill-0", "prefill-1", "decode-0", "proxy"]

    p_env, p_argv = guide["prefill"]
    assert planned["prefill-0"]["env"] == p_env
    assert_same_command(planned["prefill-0"]["argv"], p_argv)

    p1 = planned["prefill-1"]
    changed = {k for k in p_env if p1["env"][k] != p_env[k]}
    assert changed == {"ASCEND_RT_VISIBLE_DEVICES", "VLLM_ASCEND_LLMDD_RPC_PORT"}
    assert p1["argv"][p1["argv"].index("--port") + 1] != "13700"
    port_at = p_argv.index("--port") + 1
    p1_argv = list(p1["argv"])
    p1_argv[port_at] = p_argv[port_at]
    assert_same_command(p1_argv, p_argv)

    d_env, d_argv = guide["decode"]
    assert planned["decode-0"]["env"] == {**d_env, "ASCEND_RT_VISIBLE_DEVICES": "2"}
    assert_same_command(planned["decode-0"]["argv"], d_argv)

    proxy = planned["proxy"]["argv"]
    at = proxy.index("--prefiller-port")
    assert proxy[at + 1 : at + 3] == ["13700", "13702"]


def test_print_plan_shell_is_runnable_shell() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdsupervisord.daemon",
            "-c",
            str(ROOT / "conf" / "qwen25vl-1p1d.toml"),
            "--print-plan",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    # bash -n parses without running: the output must be valid shell.
    subprocess.run(["bash", "-n"], input=out, check=True, text=True, timeout=10)
    guide = _guide()
    env, argv = _parse_block(out.split("\n\n")[0])
    assert env == guide["prefill"][0]
    assert_same_command(argv, guide["prefill"][1])


def test_engine_spec_rpc_range_covers_tp_times_dp(tmp_path: Path) -> None:
    text = (ROOT / "conf" / "qwen25vl-1p1d.toml").read_text()
    text = text.replace(
        "tensor_parallel_size = 1\nstartup", "tensor_parallel_size = 2\nstartup", 1
    )
    text = text.replace("devices = [0]", "devices = [0, 2]")
    topo = config.loads(text, tmp_path / "t.toml")
    spec = plan.engine_spec(topo, "prefill", 0)
    assert spec.rpc_ports == (5959, 5960)
    assert spec.env["ASCEND_RT_VISIBLE_DEVICES"] == "0,2"
    assert spec.argv[spec.argv.index("--tensor-parallel-size") + 1] == "2"


def test_pool_slot_draws_next_devices_and_ports() -> None:
    topo = config.load(ROOT / "conf" / "demo.toml")
    first_pool = plan.engine_spec(topo, "prefill", 1)
    assert first_pool.name == "prefill-1"
    assert first_pool.port == topo.prefill.slots[1].port
    assert first_pool.devices == topo.prefill.slots[1].devices
    assert first_pool.devices != plan.engine_spec(topo, "prefill", 0).devices


def test_pinned_instance_prints_with_taskset() -> None:
    text = (ROOT / "conf" / "demo.toml").read_text()
    text = text.replace("devices = [1]\n", "devices = [1]\ncpus = [0, 1]\n")
    topo = config.loads(text, ROOT / "conf" / "demo.toml")
    shell = plan.render_shell(plan.initial_plan(topo))
    decode_block = next(b for b in shell.split("\n\n") if b.startswith("# decode-0"))
    assert "\ntaskset -c 0,1 " in decode_block
    assert plan.initial_plan(topo).by_name("decode-0").cpus == (0, 1)
