"""Topology checks: each known misconfiguration, its exact message and location.

Topologies start from the shipped confs (the guide's 1P1D, Mooncake, NIXL on
GPU) with one edit each; the host is described by a HostFacts value, so no
test depends on this machine's interfaces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from pdsupervisord import checks, config, plan
from pdsupervisord.checks import Finding, HostFacts

ROOT = Path(__file__).resolve().parents[1]

#: The guide's machine: 192.0.0.1 on eth0, which is also its default route.
GUIDE_HOST = HostFacts({"lo": ("127.0.0.1",), "eth0": ("192.0.0.1",)}, "192.0.0.1")
#: Some other machine: the guide's topology is being planned for 192.0.0.1.
OTHER_HOST = HostFacts({"lo": ("127.0.0.1",), "ens3": ("10.0.0.5",)}, "10.0.0.5")

Edit = Callable[[str], str]


def _same(text: str) -> str:
    return text


def write(
    tmp_path: Path,
    edit: Edit = _same,
    name: str = "qwen25vl-1p1d.toml",
    ascend: str = "generate_ranktable = true\n",
) -> Path:
    """A shipped conf, edited, with an ``[ascend]`` table appended."""
    text = edit((ROOT / "conf" / name).read_text())
    if ascend and "[ascend]" not in text:
        text += f"\n[ascend]\n{ascend}"
    path = tmp_path / name
    path.write_text(text)
    return path


def found(path: Path, host: HostFacts = GUIDE_HOST) -> list[str]:
    """Every finding for the file, as ``checks`` prints them."""
    topo, problems = checks.load(path)
    if topo is not None:
        problems = checks.topology_findings(topo, host)
    return [str(f) for f in problems]


def at(path: Path, needle: str, nth: int = 1) -> str:
    """``FILE:LINE`` of the ``nth`` line that starts with ``needle``."""
    lines = path.read_text().splitlines()
    hits = [n for n, line in enumerate(lines, 1) if line.startswith(needle)]
    return f"{path}:{hits[nth - 1]}"


def sub(pattern: str, replacement: str) -> Edit:
    return lambda text: re.sub(pattern, replacement, text, flags=re.M)


def test_the_guide_topology_is_clean_on_its_own_host(tmp_path: Path) -> None:
    assert found(write(tmp_path)) == []


# --------------------------------------------------------------------------- #
# RPC port ranges, HTTP ports, devices
# --------------------------------------------------------------------------- #


def test_overlapping_llmdatadist_rpc_ports(tmp_path: Path) -> None:
    path = write(tmp_path, sub("^rpc_port = 5979", "rpc_port = 5959"))
    assert found(path) == [
        f"{at(path, 'rpc_port = 5959', 2)}: error: decode.instances[0].rpc_port: "
        "decode-0's VLLM_ASCEND_LLMDD_RPC_PORT range 5959 overlaps prefill-0's "
        "VLLM_ASCEND_LLMDD_RPC_PORT range 5959 on 192.0.0.1: give each its own ports"
    ]


def test_rpc_ranges_are_tp_times_dp_wide(tmp_path: Path) -> None:
    edit = sub(
        r"^tensor_parallel_size = 1\nstartup_timeout = 1800 ",
        "tensor_parallel_size = 2\nstartup_timeout = 1800 ",
    )
    path = write(
        tmp_path,
        lambda t: sub("^rpc_port = 5979", "rpc_port = 5960")(
            edit(t).replace("devices = [0] ", "devices = [0, 2]")
        ),
    )
    assert found(path) == [
        f"{at(path, 'rpc_port = 5960')}: error: decode.instances[0].rpc_port: "
        "decode-0's VLLM_ASCEND_LLMDD_RPC_PORT range 5960 overlaps prefill-0's "
        "VLLM_ASCEND_LLMDD_RPC_PORT range 5959-5960 on 192.0.0.1: give each its own "
        "ports"
    ]


def test_unset_rpc_ports_collide_on_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, sub(r"^rpc_port = .*\n", ""))
    assert found(path) == [
        f"{at(path, '[[decode.instances]]')}: error: decode.instances[0].rpc_port: "
        "decode-0's VLLM_ASCEND_LLMDD_RPC_PORT range 5557 (unset: the default) "
        "overlaps prefill-0's VLLM_ASCEND_LLMDD_RPC_PORT range 5557 (unset: the "
        "default) on 192.0.0.1: give each its own ports"
    ]


def test_rpc_range_over_an_http_port(tmp_path: Path) -> None:
    path = write(tmp_path, sub("^rpc_port = 5959", "rpc_port = 13701"))
    assert found(path) == [
        f"{at(path, 'rpc_port = 13701')}: error: prefill.instances[0].rpc_port: "
        "decode-0's HTTP port 13701 overlaps prefill-0's VLLM_ASCEND_LLMDD_RPC_PORT "
        "range 13701 on 192.0.0.1: give each its own ports"
    ]


def test_pool_slots_are_checked_too(tmp_path: Path) -> None:
    pool = "\n[prefill.pool]\nports = [13702]\ndevices = [2]\nrpc_ports = [5979]\n"
    pool += "\n[decode]\n"
    path = write(
        tmp_path,
        lambda t: t.replace("max = 1\n", "max = 2\n").replace("\n[decode]\n", pool),
    )
    assert found(path) == [
        f"{at(path, 'rpc_port = 5979')}: error: decode.instances[0].rpc_port: "
        "decode-0's VLLM_ASCEND_LLMDD_RPC_PORT range 5979 overlaps prefill-1's "
        "VLLM_ASCEND_LLMDD_RPC_PORT range 5979 on 192.0.0.1: give each its own ports"
    ]


def test_duplicate_http_ports(tmp_path: Path) -> None:
    path = write(tmp_path, sub("^port = 13701", "port = 13700"))
    assert found(path) == [
        f"{at(path, '[decode]')}: error: decode: port 13700 on 192.0.0.1 is used by "
        "both prefill-0 (instance) and decode-0 (instance)"
    ]


def test_device_used_by_two_instances(tmp_path: Path) -> None:
    path = write(tmp_path, sub(r"^devices = \[1\]", "devices = [0]"))
    assert found(path) == [
        f"{at(path, '[decode]')}: error: decode: device 0 on 192.0.0.1 is used by "
        "both prefill-0 (instance) and decode-0 (instance)"
    ]


def test_device_made_visible_to_two_instances_by_env(tmp_path: Path) -> None:
    edit = sub(
        r"^devices = \[1\]", 'devices = [1]\nenv = { ASCEND_RT_VISIBLE_DEVICES = "0" }'
    )
    path = write(tmp_path, edit)
    assert found(path) == [
        f"{at(path, 'env = {')}: error: "
        "decode.instances[0].env.ASCEND_RT_VISIBLE_DEVICES: device 0 on 192.0.0.1 "
        "is visible to both prefill-0 and decode-0"
    ]


def test_device_count_is_not_tp_times_dp(tmp_path: Path) -> None:
    path = write(tmp_path, sub(r"^devices = \[0\]", "devices = [0, 2]"))
    assert found(path) == [
        f"{at(path, 'devices = [0, 2]')}: error: prefill.instances[0].devices: 2 "
        "devices given but tensor_parallel_size x data_parallel_size = 1"
    ]


def test_visible_device_count_set_by_env(tmp_path: Path) -> None:
    edit = sub("^min = 1", 'min = 1\nenv = { ASCEND_RT_VISIBLE_DEVICES = "0,2" }')
    path = write(tmp_path, edit)
    assert found(path) == [
        f"{at(path, 'env = {')}: error: prefill.env.ASCEND_RT_VISIBLE_DEVICES: "
        "prefill-0 sees 2 devices (ASCEND_RT_VISIBLE_DEVICES=0,2) but "
        "tensor_parallel_size x data_parallel_size = 1"
    ]


def test_an_instance_without_devices_beside_others_with_them(tmp_path: Path) -> None:
    path = write(tmp_path, sub(r"^devices = \[1\]\n", ""))
    where = at(path, "[[decode.instances]]")
    assert found(path) == [
        f"{where}: warning: decode.instances[0].devices: decode-0 "
        "sets no ASCEND_RT_VISIBLE_DEVICES: it sees every device of its host"
    ]


# --------------------------------------------------------------------------- #
# Environment: deprecated variable, HCCL_IF_IP, interfaces, rank table
# --------------------------------------------------------------------------- #


def test_deprecated_llmdd_rpc_port_variable(tmp_path: Path) -> None:
    path = write(tmp_path, sub(r"^\[env\]", '[env]\nVLLM_LLMDD_RPC_PORT = "5959"'))
    assert found(path) == [
        f"{at(path, 'VLLM_LLMDD_RPC_PORT =')}: error: env.VLLM_LLMDD_RPC_PORT: "
        "VLLM_LLMDD_RPC_PORT is ignored since vllm-ascend v0.10.1, so instances fall "
        "back to port 5557 and collide; use rpc_port, which exports "
        "VLLM_ASCEND_LLMDD_RPC_PORT"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "127.0.0.1",
            "HCCL_IF_IP is 127.0.0.1, a loopback address: HCCL cannot reach other NPUs "
            "through it (vllm-ascend #2399); set it to this host's address on the "
            "NPU-reachable network",
        ),
        (
            "10.1.2.3",
            "HCCL_IF_IP 10.1.2.3 is not an address of this host (it has 127.0.0.1, "
            "192.0.0.1)",
        ),
        ("node1", "HCCL_IF_IP 'node1' is not an IP address"),
    ],
)
def test_hccl_if_ip_must_be_an_address_of_the_host(
    tmp_path: Path, value: str, message: str
) -> None:
    path = write(tmp_path, sub('^HCCL_IF_IP = "192.0.0.1"', f'HCCL_IF_IP = "{value}"'))
    assert found(path) == [
        f"{at(path, 'HCCL_IF_IP =')}: error: env.HCCL_IF_IP: {message}"
    ]


def test_socket_interface_that_does_not_exist(tmp_path: Path) -> None:
    path = write(
        tmp_path, sub('^GLOO_SOCKET_IFNAME = "eth0"', 'GLOO_SOCKET_IFNAME = "eth9"')
    )
    assert found(path) == [
        f"{at(path, 'GLOO_SOCKET_IFNAME')}: error: env.GLOO_SOCKET_IFNAME: "
        "GLOO_SOCKET_IFNAME names eth9, which is not an interface of this host (it "
        "has eth0, lo)"
    ]


def test_hccl_socket_ifname_matches_by_prefix_and_skips_exclusions(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        sub('^HCCL_SOCKET_IFNAME = "eth0"', 'HCCL_SOCKET_IFNAME = "eth,^docker"'),
    )
    assert found(path) == []


def test_planning_for_another_host_turns_host_checks_into_warnings(
    tmp_path: Path,
) -> None:
    path = write(tmp_path)
    interface = "it has ens3, lo"
    where = at(path, 'host = "192.0.0.1"')
    assert found(path, OTHER_HOST) == [
        f"{where}: warning: prefill.instances[0].host: 192.0.0.1 "
        "(prefill-0, decode-0) is not an address of this host: planning for another "
        "host, so its interface and address checks are warnings",
        *(
            f"{at(path, f'{var} =')}: warning: env.{var}: {var} names eth0, which is "
            f"not an interface of this host ({interface})"
            for var in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME")
        ),
    ]


def test_missing_rank_table_path_for_llmdatadist(tmp_path: Path) -> None:
    path = write(tmp_path, sub("^DISAGGREGATED_PREFILL_RANK_TABLE_PATH.*\n", ""))
    assert found(path) == [
        f"{at(path, '[env]')}: error: env: "
        "DISAGGREGATED_PREFILL_RANK_TABLE_PATH is not set, and "
        "LLMDataDistCMgrConnector cannot start without a rank table: set it "
        "in [env] (pdsupervisord ranktable -c FILE writes the file)"
    ]


def test_rank_table_that_does_not_exist_and_is_not_generated(tmp_path: Path) -> None:
    path = write(tmp_path, ascend="")
    assert found(path) == [
        f"{at(path, 'DISAGGREGATED_PREFILL_RANK_TABLE_PATH')}: error: "
        "env.DISAGGREGATED_PREFILL_RANK_TABLE_PATH: "
        "DISAGGREGATED_PREFILL_RANK_TABLE_PATH is "
        "/path/to/your/generated/ranktable.json, which does not exist: run "
        "pdsupervisord ranktable -c FILE or set [ascend] generate_ranktable = true"
    ]


def test_kv_role_other_than_producer_for_prefill(tmp_path: Path) -> None:
    path = write(tmp_path, sub("^min = 1", 'min = 1\nkv_role = "kv_both"'))
    assert found(path) == [
        f"{at(path, 'kv_role =')}: error: prefill.kv_role: kv_role is 'kv_both', but "
        "LLMDataDistCMgrConnector needs 'kv_producer' for prefill instances"
    ]


def test_kv_role_other_than_consumer_for_decode(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        sub(
            "^startup_timeout = 1800$",
            'startup_timeout = 1800\nkv_role = "kv_producer"',
        ),
    )
    assert found(path) == [
        f"{at(path, 'kv_role =')}: error: decode.kv_role: kv_role is 'kv_producer', "
        "but LLMDataDistCMgrConnector needs 'kv_consumer' for decode instances"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    def edit(text: str) -> str:
        text = text.replace('HCCL_IF_IP = "192.0.0.1"', 'HCCL_IF_IP = "127.0.0.1"')
        text = text.replace(
            'GLOO_SOCKET_IFNAME = "eth0"', 'GLOO_SOCKET_IFNAME = "bond0"'
        )
        text = text.replace("[env]\n", '[env]\nVLLM_LLMDD_RPC_PORT = "5959"\n')
        text = text.replace("min = 1\n", 'min = 1\nkv_role = "kv_both"\n')
        return text.replace("rpc_port = 5979", "rpc_port = 5959")

    keys = [line.split(": ")[2] for line in found(write(tmp_path, edit))]
    assert keys == [
        "env.VLLM_LLMDD_RPC_PORT",
        "env.HCCL_IF_IP",
        "env.GLOO_SOCKET_IFNAME",
        "prefill.kv_role",
        "decode.instances[0].rpc_port",
    ]


def test_the_stand_in_demo_only_warns(tmp_path: Path) -> None:
    path = write(tmp_path, name="demo.toml", ascend="")
    findings = found(path, HostFacts({"lo": ("127.0.0.1",)}, None))
    assert not [f for f in findings if ": error: " in f]
    assert (
        f"{at(path, 'HCCL_IF_IP =')}: warning: env.HCCL_IF_IP: HCCL_IF_IP is "
        "127.0.0.1, a loopback address: HCCL cannot reach other NPUs through it "
        "(vllm-ascend #2399); set it to this host's address on the NPU-reachable "
        "network (a warning only: the stand-in engine does not use it)"
    ) in findings


# --------------------------------------------------------------------------- #
# Mooncake
# --------------------------------------------------------------------------- #

MOONCAKE = "mooncake-1p1d.toml"


def test_mooncake_example_is_clean_on_its_host(tmp_path: Path) -> None:
    assert found(write(tmp_path, name=MOONCAKE)) == []


def test_mooncake_plan_is_the_hand_checked_command() -> None:
    topo = config.load(ROOT / "conf" / MOONCAKE)
    common = {
        "HCCL_IF_IP": "192.0.0.1",
        "GLOO_SOCKET_IFNAME": "eth0",
        "TP_SOCKET_IFNAME": "eth0",
        "HCCL_SOCKET_IFNAME": "eth0",
        "OMP_PROC_BIND": "false",
        "OMP_NUM_THREADS": "10",
    }
    args = [
        "--no-enable-prefix-caching", "--seed", "1024",
        "--served-model-name", "qwen25vl",
        "--max-model-len", "40000", "--max-num-batched-tokens", "40000",
        "--trust-remote-code", "--gpu-memory-utilization", "0.9",
    ]  # fmt: skip
    sizes = (
        '"kv_connector_extra_config": {"prefill": {"dp_size": 1, "tp_size": 2}, '
        '"decode": {"dp_size": 1, "tp_size": 1}}'
    )
    module = '"kv_connector_module_path": "vllm_ascend.distributed.mooncake_connector"'
    expected = {
        "prefill-0": (
            {"ASCEND_RT_VISIBLE_DEVICES": "0,1", **common},
            ["vllm", "serve", "/model/Qwen2.5-VL-7B-Instruct", "--host", "0.0.0.0",
             "--port", "13700", "--tensor-parallel-size", "2", *args,
             "--kv-transfer-config",
             '{"kv_connector": "MooncakeConnectorV1", "kv_buffer_device": "npu", '
             f'"kv_role": "kv_producer", "kv_port": 30000, {module}, {sizes}}}'],
        ),
        "decode-0": (
            {"ASCEND_RT_VISIBLE_DEVICES": "2", **common},
            ["vllm", "serve", "/model/Qwen2.5-VL-7B-Instruct", "--host", "0.0.0.0",
             "--port", "13701", "--tensor-parallel-size", "1", *args,
             "--kv-transfer-config",
             '{"kv_connector": "MooncakeConnectorV1", "kv_buffer_device": "npu", '
             f'"kv_role": "kv_consumer", "kv_port": 30002, {module}, {sizes}}}'],
        ),
    }  # fmt: skip
    planned = {
        s.name: (dict(s.env), list(s.argv)) for s in plan.initial_plan(topo).instances
    }
    assert {name: planned[name] for name in expected} == expected
    assert list(planned["prefill-0"][0]) == list(
        expected["prefill-0"][0]
    )  # export order


def test_mooncake_kv_port_ranges_follow_slots_and_default_base(tmp_path: Path) -> None:
    pool = "\n[prefill.pool]\nports = [13702]\ndevices = [4, 5]\n\n[decode]\n"
    path = write(
        tmp_path,
        lambda t: t.replace("kv_port = 30000\n", "").replace("\n[decode]\n", pool),
        name=MOONCAKE,
    )
    topo = config.load(path)
    bases = [plan.kv_port_base(topo, "prefill", i) for i in (0, 1)]
    assert [*bases, plan.kv_port_base(topo, "decode", 0)] == [14579, 14581, 14583]
    kv = json.loads(plan.engine_spec(topo, "prefill", 1).argv[-1])
    assert (kv["kv_port"], kv["kv_role"]) == (14581, "kv_producer")


def test_mooncake_shared_engine_id(tmp_path: Path) -> None:
    path = write(
        tmp_path, sub("^kv_port = 30000", 'kv_port = 30000\nengine_id = "0"'), MOONCAKE
    )
    assert found(path) == [
        f"{at(path, 'engine_id = ')}: error: kv.engine_id: engine_id '0' is shared by "
        "prefill-0 and decode-0: MooncakeConnectorV1 needs a unique one per "
        "instance; leave it unset and vLLM draws a fresh one at every start"
    ]


def test_mooncake_fixed_prefill_engine_id_warns_about_restarts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        sub(r"^devices = \[0, 1\]", 'devices = [0, 1]\nengine_id = "p0"'),
        MOONCAKE,
    )
    assert found(path) == [
        f"{at(path, 'engine_id = ')}: warning: prefill.instances[0].engine_id: "
        "engine_id 'p0' of prefill-0 is fixed: after it restarts, decode instances "
        "keep using the KV addresses they cached under that id; leave it unset so "
        "each start gets a fresh one"
    ]


def test_mooncake_needs_prefill_tp_at_least_decode_tp(tmp_path: Path) -> None:
    def edit(text: str) -> str:
        text = text.replace("tensor_parallel_size = 2 ", "tensor_parallel_size = 1 ")
        text = text.replace("devices = [0, 1]", "devices = [0]")
        text = text.replace(
            "tensor_parallel_size = 1\nstartup", "tensor_parallel_size = 2\nstartup"
        )
        return text.replace("devices = [2]", "devices = [2, 3]")

    path = write(tmp_path, edit, MOONCAKE)
    assert found(path) == [
        f"{at(path, 'tensor_parallel_size = 1')}: error: prefill.tensor_parallel_size: "
        "prefill tensor_parallel_size 1 is smaller than decode's 2: "
        "MooncakeConnectorV1 needs prefill tp >= decode tp"
    ]


def test_mooncake_overlapping_kv_port_ranges(tmp_path: Path) -> None:
    path = write(
        tmp_path, sub(r"^devices = \[2\]", "devices = [2]\nkv_port = 30001"), MOONCAKE
    )
    assert found(path) == [
        f"{at(path, 'kv_port = 30001')}: error: decode.instances[0].kv_port: "
        "decode-0's kv_port range 30001 overlaps prefill-0's kv_port range "
        "30000-30001 on 192.0.0.1: give each its own ports"
    ]


def test_mooncake_ports_inside_the_transfer_engines_range(tmp_path: Path) -> None:
    edit = sub("^kv_port = 30000", "kv_port = 20001")
    path = write(
        tmp_path, lambda t: edit(t).replace("port = 13701", "port = 21000"), MOONCAKE
    )
    reason = (
        "lies in 20000-27999, where MooncakeConnectorV1's transfer engine binds "
        "random ports (8 NPUs per node x 1000; vllm-ascend #4725, #6455): it would "
        "fail now and then; move it out"
    )
    kv_port = at(path, "kv_port = 20001")
    assert found(path) == [
        f"{kv_port}: error: kv.kv_port: prefill-0's kv_port range 20001-20002 {reason}",
        f"{at(path, 'port = 21000')}: error: decode.instances[0].port: decode-0's "
        f"HTTP port 21000 {reason}",
        f"{kv_port}: error: kv.kv_port: decode-0's kv_port range 20003 {reason}",
    ]


def test_mooncake_extra_config_that_disagrees_with_the_topology(tmp_path: Path) -> None:
    edit = sub(
        "^kv_port = 30000",
        "kv_port = 30000\nkv_connector_extra_config = { prefill = { tp_size = 4 } }",
    )
    path = write(tmp_path, edit, MOONCAKE)
    assert found(path) == [
        f"{at(path, 'kv_connector_extra_config =')}: warning: "
        "kv.kv_connector_extra_config: kv_connector_extra_config.prefill.tp_size is "
        "4 but [prefill] gives 2; the plan uses 2"
    ]


def test_mooncake_store_connectors_get_no_pd_strategy() -> None:
    assert not plan.connector_for("MooncakeConnectorStoreV1").kv_port_ranges
    assert plan.connector_for("MooncakeLayerwiseConnector").kv_port_ranges


# --------------------------------------------------------------------------- #
# NIXL on GPUs
# --------------------------------------------------------------------------- #

NIXL = "nixl-gpu-1p1d.toml"


def test_nixl_example_is_clean_on_its_host(tmp_path: Path) -> None:
    assert found(write(tmp_path, name=NIXL, ascend="")) == []


def test_nixl_plan_is_the_hand_checked_command() -> None:
    topo = config.load(ROOT / "conf" / NIXL)
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "192.0.0.1", "UCX_NET_DEVICES": "all"}
    kv = (
        '{"kv_connector": "NixlConnector", "kv_buffer_device": "cuda", '
        '"kv_role": "kv_both"}'
    )

    def command(port: str) -> list[str]:
        return [
            "vllm", "serve", "/model/Qwen2.5-7B-Instruct", "--host", "0.0.0.0",
            "--port", port, "--tensor-parallel-size", "1",
            "--served-model-name", "qwen25", "--max-model-len", "32768",
            "--gpu-memory-utilization", "0.9", "--seed", "1024",
            "--kv-transfer-config", kv,
        ]  # fmt: skip

    expected = {
        "prefill-0": (
            {"CUDA_VISIBLE_DEVICES": "0", **env, "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600"},
            command("8100"),
        ),
        "decode-0": (
            {"CUDA_VISIBLE_DEVICES": "1", **env, "VLLM_NIXL_SIDE_CHANNEL_PORT": "5601"},
            command("8200"),
        ),
    }
    planned = {
        s.name: (dict(s.env), list(s.argv)) for s in plan.initial_plan(topo).instances
    }
    assert {name: planned[name] for name in expected} == expected
    assert list(planned["decode-0"][0]) == list(expected["decode-0"][0])


def test_nixl_with_ascend_device_variable(tmp_path: Path) -> None:
    path = write(tmp_path, sub("^devices_env = .*\n", ""), NIXL, ascend="")
    assert found(path) == [
        f"{at(path, '[engine]')}: error: engine.devices_env: NixlConnector selects its "
        "devices with CUDA_VISIBLE_DEVICES, but devices_env is "
        "ASCEND_RT_VISIBLE_DEVICES: the engines would ignore their device lists "
        "(vllm #20965, #25059)"
    ]


def test_nixl_side_channel_ports_must_differ(tmp_path: Path) -> None:
    path = write(tmp_path, sub(r"^rpc_port = .*\n", ""), NIXL, ascend="")
    assert found(path) == [
        f"{at(path, '[[decode.instances]]')}: error: decode.instances[0].rpc_port: "
        "decode-0's VLLM_NIXL_SIDE_CHANNEL_PORT range 5600 (unset: the default) "
        "overlaps prefill-0's VLLM_NIXL_SIDE_CHANNEL_PORT range 5600 (unset: the "
        "default) on 192.0.0.1: give each its own ports"
    ]


def test_nixl_kv_role(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        sub('^kv_role = "kv_both"', 'kv_role = "kv_consumer"'),
        NIXL,
        ascend="",
    )
    assert found(path) == [
        f"{at(path, 'kv_role =')}: error: prefill.kv_role: kv_role is 'kv_consumer', "
        "but NixlConnector needs 'kv_producer' or 'kv_both' for prefill instances"
    ]


def test_nixl_shared_engine_id(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        sub('^kv_buffer_device = "cuda"', 'kv_buffer_device = "cuda"\nengine_id = "x"'),
        NIXL,
        ascend="",
    )
    assert [f.split(": ")[2] for f in found(path)] == ["kv.engine_id"]


# --------------------------------------------------------------------------- #
# Small pieces
# --------------------------------------------------------------------------- #


def test_host_facts_locality() -> None:
    assert GUIDE_HOST.is_local("192.0.0.1")
    assert GUIDE_HOST.is_local("127.0.0.2") and GUIDE_HOST.is_local("localhost")
    assert not GUIDE_HOST.is_local("192.0.0.2") and not GUIDE_HOST.is_local("node1")


def test_probe_host_reads_this_machine() -> None:
    facts = checks.probe_host()
    assert "127.0.0.1" in facts.addresses
    assert facts.default_ip is None or facts.default_ip in facts.addresses


def test_finding_renders_like_a_compiler_message() -> None:
    assert (
        str(Finding("warning", "env.X", "why", "t.toml", 3))
        == "t.toml:3: warning: env.X: why"
    )
    assert str(Finding("error", "", "why")) == "error: why"


def test_config_rejects_bad_device_ips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        sub(r"^devices = \[1\]", 'devices = [1]\ndevice_ips = ["29.1.0.11", "x"]'),
    )
    assert found(path) == [
        f"{at(path, 'device_ips')}: error: decode.instances[0].device_ips: "
        "2 given for 1 devices",
        f"{at(path, 'device_ips')}: error: decode.instances[0].device_ips: "
        "'x' is not an IPv4 address",
    ]


def test_config_checks_ascend_keys(tmp_path: Path) -> None:
    path = write(tmp_path, ascend='preflight = "yes"\nnpus_per_node = 0\n')
    assert found(path) == [
        f"{at(path, 'preflight')}: error: ascend.preflight: expected a boolean, "
        "got a string ('yes')",
        f"{at(path, 'npus_per_node')}: error: ascend.npus_per_node: must be >= 1, "
        "got 0",
    ]


def test_ascend_defaults_follow_the_chip(tmp_path: Path) -> None:
    topo = config.load(write(tmp_path, ascend='chip = "A3"\nhccn_tool = "bin/hccn"\n'))
    assert topo.ascend.npus_per_node == 16
    assert topo.ascend.hccn_tool == str(tmp_path / "bin" / "hccn")
    assert topo.ascend.npu_smi == "npu-smi"
