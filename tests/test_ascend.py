"""Rank tables and the NPU network pre-flight, against fake hccn_tool/npu-smi.

The fakes in tests/fakes print the real tools' output formats; a device is
broken with FAKE_HCCN_BROKEN="DEV:FAULT". Every test copies them into its
own directory and puts that first on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from pdsupervisord import ascend, checks, config, tools
from pdsupervisord.checks import HostFacts
from pdsupervisord.errors import AscendError

ROOT = Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"
DATA = ROOT / "tests" / "data"

#: The guide's machine: 192.0.0.1 on eth0, which is also its default route.
GUIDE_HOST = HostFacts({"lo": ("127.0.0.1",), "eth0": ("192.0.0.1",)}, "192.0.0.1")


@pytest.fixture(autouse=True)
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake hccn_tool and npu-smi first on PATH; no fault switches inherited."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("hccn_tool", "npu-smi"):
        target = bin_dir / name
        shutil.copy(FAKES / name, target)
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in list(os.environ):
        if name.startswith("FAKE_"):
            monkeypatch.delenv(name)
    return bin_dir


def guide_conf(
    tmp_path: Path, name: str = "qwen25vl-1p1d.toml", ascend: str = ""
) -> Path:
    """A copy of a shipped guide topology, with fake hccn.conf and ``ascend`` keys."""
    text = (ROOT / "conf" / name).read_text()
    text += f'\n[ascend]\nhccn_conf = "{FAKES / "hccn.conf"}"\n{ascend}'
    path = tmp_path / name
    path.write_text(text)
    return path


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, host: HostFacts = GUIDE_HOST
) -> tuple[int, str, str]:
    code = tools.main(list(argv), host=host)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- #
# ranktable
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("qwen25vl-1p1d.toml", "ranktable-qwen25vl-1p1d.json"),
        ("qwen25vl-2p1d.toml", "ranktable-qwen25vl-2p1d.json"),
    ],
)
def test_ranktable_of_the_guide_is_byte_equal_to_the_hand_written_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], conf: str, expected: str
) -> None:
    out = tmp_path / "ranktable.json"
    code, stdout, stderr = run(
        capsys, "ranktable", "-c", str(guide_conf(tmp_path, conf)), "-o", str(out)
    )

    assert (code, stdout, stderr) == (0, f"wrote {out}\n", "")
    assert out.read_bytes() == (DATA / expected).read_bytes()


def test_ranktable_left_alone_when_unchanged_and_replaced_when_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = str(guide_conf(tmp_path))
    out = tmp_path / "ranktable.json"
    run(capsys, "ranktable", "-c", conf, "-o", str(out))
    before = out.stat()

    code, stdout, _ = run(capsys, "ranktable", "-c", conf, "-o", str(out))
    after = out.stat()
    assert (code, stdout) == (0, f"{out} is up to date\n")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    out.write_text('{"stale": true}\n')
    code, stdout, _ = run(capsys, "ranktable", "-c", conf, "-o", str(out))
    assert (code, stdout) == (0, f"wrote {out}\n")
    assert out.read_bytes() == (DATA / "ranktable-qwen25vl-1p1d.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_ranktable_goes_to_the_path_the_engines_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = guide_conf(tmp_path)
    target = tmp_path / "tables" / "ranktable.json"
    conf.write_text(
        conf.read_text().replace("/path/to/your/generated/ranktable.json", str(target))
    )

    code, stdout, _ = run(capsys, "ranktable", "-c", str(conf))

    assert (code, stdout) == (0, f"wrote {target}\n")
    assert target.read_bytes() == (DATA / "ranktable-qwen25vl-1p1d.json").read_bytes()


def test_ranktable_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = run(
        capsys, "ranktable", "-c", str(guide_conf(tmp_path)), "-o", "-"
    )
    assert code == 0
    assert stdout == (DATA / "ranktable-qwen25vl-1p1d.json").read_text()


A3_TOPOLOGY = """
[model]
path = "/model/m"

[env]
DISAGGREGATED_PREFILL_RANK_TABLE_PATH = "{out}"

[kv]
kv_connector = "LLMDataDistCMgrConnector"

[prefill]
tensor_parallel_size = 2

[[prefill.instances]]
host = "10.0.0.1"
port = 13700
devices = [2, 3]
rpc_port = 5959

[decode]
tensor_parallel_size = 2

[[decode.instances]]
host = "10.0.0.2"
port = 13701
devices = [0, 1]
rpc_port = 5979
device_ips = ["192.168.2.100", "192.168.2.101"]
super_device_ids = ["16777232", "16777233"]
super_pod_id = "1"

[proxy]
kind = "none"

[ascend]
chip = "A3"
hccn_conf = "{hccn_conf}"
"""


def test_a3_ranktable_has_super_ids_and_spans_two_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ranktable.json"
    conf = tmp_path / "a3.toml"
    conf.write_text(A3_TOPOLOGY.format(out=out, hccn_conf=FAKES / "hccn.conf"))
    host = HostFacts({"lo": ("127.0.0.1",), "eth0": ("10.0.0.1",)}, "10.0.0.1")

    code, stdout, stderr = run(capsys, "ranktable", "-c", str(conf), host=host)

    assert (code, stdout, stderr) == (0, f"wrote {out}\n", "")
    assert out.read_bytes() == (DATA / "ranktable-a3-two-nodes.json").read_bytes()


def test_unreadable_device_ip_is_an_error_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HCCN_BROKEN", "1:noip")
    out = tmp_path / "ranktable.json"

    code, stdout, stderr = run(
        capsys, "ranktable", "-c", str(guide_conf(tmp_path)), "-o", str(out)
    )

    assert (code, stdout) == (1, "")
    assert stderr == (
        "pdsupervisord ranktable: no rank table written\n"
        "  device 1: `hccn_tool -i 1 -ip -g` gave no usable address ('-.-.-.-'); "
        "its NPU NIC is not configured: "
        "hccn_tool -i 1 -ip -s address ADDR netmask MASK\n"
    )
    assert not out.exists()


def test_every_bad_device_and_a_missing_hccn_conf_are_reported_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HCCN_BROKEN", "0:noip,2:error")
    topo = config.load(guide_conf(tmp_path, "qwen25vl-2p1d.toml", 'chip = "A2"\n'))
    missing = tmp_path / "nowhere" / "hccn.conf"
    topo = _with_ascend(topo, hccn_conf=missing)

    with pytest.raises(AscendError) as info:
        ascend.build_ranktable(topo)

    assert info.value.problems == (
        f"{missing} does not exist: the NPU NICs of this host were never configured "
        "(hccn_tool -i N -ip -s address ADDR netmask MASK writes it); set [ascend] "
        "hccn_conf if it lives elsewhere",
        "device 0: `hccn_tool -i 0 -ip -g` gave no usable address ('-.-.-.-'); its "
        "NPU NIC is not configured: hccn_tool -i 0 -ip -s address ADDR netmask MASK",
        "`hccn_tool -i 2 -ip -g` failed (exit 1): dsmi get info failed, ret:-8020 "
        "logic_id:2",
    )


def test_missing_hccn_tool_says_where_to_point_it(tmp_path: Path) -> None:
    conf = guide_conf(tmp_path, ascend='hccn_tool = "/opt/none/hccn_tool"\n')
    with pytest.raises(AscendError) as info:
        ascend.build_ranktable(config.load(conf))
    assert info.value.problems == (
        "hccn_tool not found ('/opt/none/hccn_tool' is not there); set [ascend] "
        "hccn_tool to its path, usually /usr/local/Ascend/driver/tools/hccn_tool",
    )


def test_instance_that_will_not_find_its_entry_is_an_error_on_its_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 192.0.0.1 is on this host, but vLLM will take the default-route address.
    host = HostFacts({"eth0": ("192.0.0.1",), "eth1": ("10.9.9.9",)}, "10.9.9.9")
    conf = guide_conf(tmp_path)
    out = tmp_path / "ranktable.json"

    code, _, stderr = run(
        capsys, "ranktable", "-c", str(conf), "-o", str(out), host=host
    )

    line = _line_of(conf, 'host = "192.0.0.1"                      # where the proxy')
    assert code == 1
    assert stderr.splitlines()[0] == (
        f"{conf}:{line}: error: prefill.instances[0].host: prefill-0 will not find "
        "itself in the rank table: no prefill_device_list entry has server_id "
        "10.9.9.9 and device_id 0 (vLLM matches VLLM_HOST_IP, else the "
        "default-route address); give it host = '10.9.9.9' or set VLLM_HOST_IP"
    )
    assert out.exists()


def test_planning_for_another_host_only_warns_about_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = HostFacts({"lo": ("127.0.0.1",), "ens3": ("10.9.9.9",)}, "10.9.9.9")
    out = tmp_path / "ranktable.json"
    code, _, stderr = run(
        capsys, "ranktable", "-c", str(guide_conf(tmp_path)), "-o", str(out), host=host
    )
    assert (code, stderr) == (0, "")


def test_vllm_host_ip_becomes_the_server_id(tmp_path: Path) -> None:
    conf = guide_conf(tmp_path)
    conf.write_text(
        conf.read_text().replace("[env]\n", '[env]\nVLLM_HOST_IP = "10.1.1.1"\n')
    )
    table = ascend.build_ranktable(config.load(conf))
    servers = {
        e["server_id"]
        for e in table["prefill_device_list"] + table["decode_device_list"]
    }
    assert servers == {"10.1.1.1"}


def test_write_failure_is_an_ascend_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AscendError, match=r"the rank table .*/file/ranktable.json"):
        ascend.write_if_changed(blocker / "ranktable.json", "{}\n")


# --------------------------------------------------------------------------- #
# check
# --------------------------------------------------------------------------- #

HEALTHY = """\
DEVICE  CHECK       RESULT  DETAIL                                       FIX
0       lldp        OK      Ifname: 400GE1/1/5:1
0       link        OK      link status: UP
0       net_health  OK      net health status: Success
0       netdetect   OK      netdetect address: 29.1.0.1
0       gateway     OK      default gateway:29.1.0.1
0       ip          OK      ipaddr:29.1.0.10
0       hccn.conf   OK      address_0=29.1.0.10 netmask_0=255.255.255.0
1       lldp        OK      Ifname: 400GE1/1/5:2
1       link        OK      link status: UP
1       net_health  OK      net health status: Success
1       netdetect   OK      netdetect address: 29.1.0.1
1       gateway     OK      default gateway:29.1.0.1
1       ip          OK      ipaddr:29.1.0.11
1       hccn.conf   OK      address_1=29.1.0.11 netmask_1=255.255.255.0
0 of 14 device checks failed; 0 errors, 0 warnings in the topology
"""


def test_check_on_a_healthy_host_prints_the_table_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")
    assert run(capsys, "check", "-c", str(conf)) == (0, HEALTHY, "")


@pytest.mark.parametrize(
    "case",
    [
        (
            "nolldp",
            "lldp",
            "`hccn_tool -i 1 -lldp -g` unexpected: Chassis ID TLV",
            "no switch port seen: check the port's cable and optical module "
            "(hccn_tool -i 1 -optical -g) and that the switch runs LLDP",
        ),
        (
            "down",
            "link",
            "link status: DOWN",
            "bring the port up: check the cable, the optical module "
            "(hccn_tool -i 1 -optical -g) and the switch port",
        ),
        (
            "unhealthy",
            "net_health",
            "net health status: Fault",
            "the NPU cannot reach its detect address: fix netdetect and gateway, "
            "then the switch (hccn_tool -i 1 -netdetect -s address ADDR)",
        ),
        (
            "nodetect",
            "netdetect",
            "netdetect address: 0.0.0.0",
            "set a reachable detect address: hccn_tool -i 1 -netdetect -s address ADDR",
        ),
        (
            "nogateway",
            "gateway",
            "default gateway:0.0.0.0",
            "set the gateway: hccn_tool -i 1 -gateway -s gateway ADDR",
        ),
        (
            "noip",
            "ip",
            "ipaddr:-.-.-.-",
            "configure the NIC: hccn_tool -i 1 -ip -s address ADDR netmask MASK",
        ),
    ],
)
def test_check_on_each_broken_host_shows_the_failure_and_exits_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, str, str, str],
) -> None:
    fault, check, detail, hint = case
    monkeypatch.setenv("FAKE_HCCN_BROKEN", f"1:{fault}")
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")

    code = tools.main(["check", "-c", str(conf), "--json"], host=GUIDE_HOST)
    document = json.loads(capsys.readouterr().out)

    assert code == 1 and document["ok"] is False
    failed = [row for row in document["devices"] if not row["ok"]]
    assert {
        "device": 1,
        "check": check,
        "ok": False,
        "detail": detail,
        "hint": hint,
    } in failed
    extra = {"nodetect": {"net_health"}}.get(fault, set())
    assert {row["check"] for row in failed} == {check} | extra


def test_check_table_shows_fail_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HCCN_BROKEN", "0:down")
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")
    code, out, _ = run(capsys, "check", "-c", str(conf))
    assert code == 1
    assert (
        "0       link        FAIL    link status: DOWN                            "
        "bring the port up: check the cable, the optical module "
        "(hccn_tool -i 0 -optical -g) and the switch port"
    ) in out.splitlines()
    assert out.splitlines()[-1] == (
        "1 of 14 device checks failed; 0 errors, 0 warnings in the topology"
    )


def test_check_flags_hccn_conf_that_disagrees_with_the_nic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hccn_conf = tmp_path / "hccn.conf"
    hccn_conf.write_text(
        (FAKES / "hccn.conf")
        .read_text()
        .replace("address_1=29.1.0.11", "address_1=29.1.0.99")
    )
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")
    conf.write_text(conf.read_text().replace(str(FAKES / "hccn.conf"), str(hccn_conf)))

    tools.main(["check", "-c", str(conf), "--json"], host=GUIDE_HOST)
    rows = json.loads(capsys.readouterr().out)["devices"]

    assert [row for row in rows if not row["ok"]] == [
        {
            "device": 1,
            "check": "hccn.conf",
            "ok": False,
            "detail": "address_1=29.1.0.99 but the NIC has 29.1.0.11",
            "hint": f"the NIC's address is what HCCL uses: correct {hccn_conf} or "
            "hccn_tool -i 1 -ip -s address ADDR netmask MASK",
        }
    ]


def test_check_without_hccn_conf_fails_every_device(tmp_path: Path) -> None:
    topo = _with_ascend(config.load(guide_conf(tmp_path)), hccn_conf=tmp_path / "none")
    rows = [r for r in ascend.preflight(topo) if r.check == "hccn.conf"]
    assert [(r.device, r.ok, r.detail) for r in rows] == [
        (0, False, f"{tmp_path / 'none'} does not exist"),
        (1, False, f"{tmp_path / 'none'} does not exist"),
    ]


def test_check_without_hccn_tool_is_one_failed_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = guide_conf(
        tmp_path, ascend='generate_ranktable = true\nhccn_tool = "no-such-hccn_tool"\n'
    )
    code, out, _ = run(capsys, "check", "-c", str(conf))
    assert code == 1
    assert out.splitlines()[1] == (
        "-       hccn_tool  FAIL    hccn_tool not found ('no-such-hccn_tool' is not on "
        "PATH); set [ascend] hccn_tool to its path, usually "
        "/usr/local/Ascend/driver/tools/hccn_tool"
    )


def test_a3_check_adds_the_vnic_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HCCN_BROKEN", "2:novnic")
    conf = tmp_path / "a3.toml"
    conf.write_text(
        A3_TOPOLOGY.format(out=tmp_path / "rt.json", hccn_conf=FAKES / "hccn.conf")
    )
    rows = ascend.preflight(config.load(conf))
    assert [r.check for r in rows if r.device == 2] == [
        "lldp",
        "link",
        "net_health",
        "netdetect",
        "gateway",
        "ip",
        "vnic",
        "hccn.conf",
    ]
    assert [(r.device, r.check, r.detail) for r in rows if not r.ok] == [
        (2, "vnic", "vnic ipaddr: -.-.-.-")
    ]


def test_check_reports_topology_problems_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")
    conf.write_text(
        conf.read_text().replace('HCCL_IF_IP = "192.0.0.1"', 'HCCL_IF_IP = "127.0.0.1"')
    )
    code, out, _ = run(capsys, "check", "-c", str(conf), "--topology-only")
    line = _line_of(conf, "HCCL_IF_IP =")
    assert code == 1
    assert out == (
        f"{conf}:{line}: error: env.HCCL_IF_IP: HCCL_IF_IP is 127.0.0.1, a loopback "
        "address: HCCL cannot reach other NPUs through it (vllm-ascend #2399); set it "
        "to this host's address on the NPU-reachable network\n"
        "no device checks run; 1 error, 0 warnings in the topology\n"
    )


def test_check_finds_a_stale_rank_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "ranktable.json"
    stale.write_text(
        (DATA / "ranktable-qwen25vl-2p1d.json")
        .read_text()
        .replace('"device_id": "1"', '"device_id": "5"')
    )
    conf = guide_conf(tmp_path)
    conf.write_text(
        conf.read_text().replace("/path/to/your/generated/ranktable.json", str(stale))
    )

    code, out, _ = run(capsys, "check", "-c", str(conf), "--topology-only")

    assert code == 1
    assert (
        "decode-0 will not find itself in the rank table: no decode_device_list "
        "entry has server_id 192.0.0.1 and device_id 1" in out
    )


def test_invalid_topology_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = guide_conf(tmp_path, ascend='chip = "A4"\n')
    code, out, err = run(capsys, "check", "-c", str(conf))
    assert (code, out) == (2, "")
    assert "error: ascend.chip: must be one of A2, A3; got 'A4'" in err


def test_daemon_dispatches_ranktable_and_keeps_its_own_options(tmp_path: Path) -> None:
    out = tmp_path / "ranktable.json"
    conf = str(guide_conf(tmp_path))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdsupervisord.daemon",
            "ranktable",
            "-c",
            conf,
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: this host is not 192.0.0.1
    assert out.read_bytes() == (DATA / "ranktable-qwen25vl-1p1d.json").read_bytes()

    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdsupervisord.daemon",
            "-c",
            conf,
            "--print-plan",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [i["name"] for i in json.loads(plan.stdout)["instances"]] == [
        "prefill-0",
        "decode-0",
        "proxy",
    ]


# --------------------------------------------------------------------------- #
# The daemon's hook: prepare() / before_first_start()
# --------------------------------------------------------------------------- #


def test_prepare_writes_the_rank_table_before_the_first_start(tmp_path: Path) -> None:
    target = tmp_path / "ranktable.json"
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\npreflight = true\n")
    conf.write_text(
        conf.read_text().replace("/path/to/your/generated/ranktable.json", str(target))
    )

    findings = checks.prepare(config.load(conf), GUIDE_HOST)

    assert findings == []
    assert target.read_bytes() == (DATA / "ranktable-qwen25vl-1p1d.json").read_bytes()


def test_prepare_refuses_on_a_failed_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HCCN_BROKEN", "0:down")
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\npreflight = true\n")
    conf.write_text(
        conf.read_text().replace(
            "/path/to/your/generated/ranktable.json", str(tmp_path / "rt.json")
        )
    )

    findings = anyio.run(checks.before_first_start, config.load(conf), GUIDE_HOST)

    assert [str(f) for f in findings] == [
        f"{conf}: error: ascend.preflight: device 0 link: link status: DOWN; fix: "
        "bring the port up: check the cable, the optical module "
        "(hccn_tool -i 0 -optical -g) and the switch port"
    ]
    assert checks.log_findings(findings) is False


def test_prepare_reports_an_unreadable_device_instead_of_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HCCN_BROKEN", "1:noip")
    target = tmp_path / "rt.json"
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")
    conf.write_text(
        conf.read_text().replace("/path/to/your/generated/ranktable.json", str(target))
    )

    findings = checks.prepare(config.load(conf), GUIDE_HOST)

    assert [(f.severity, f.key) for f in findings] == [
        ("error", "ascend.generate_ranktable")
    ]
    assert findings[0].message.startswith(
        "device 1: `hccn_tool -i 1 -ip -g` gave no usable"
    )
    assert not target.exists()


def test_prepare_stops_at_topology_errors(tmp_path: Path) -> None:
    conf = guide_conf(tmp_path, ascend="generate_ranktable = true\n")
    conf.write_text(conf.read_text().replace("rpc_port = 5979", "rpc_port = 5959"))
    findings = checks.prepare(config.load(conf), GUIDE_HOST)
    assert [f.key for f in findings] == ["decode.instances[0].rpc_port"]
    assert not list(tmp_path.glob("*.json"))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _with_ascend(topo: config.Topology, **changes: Any) -> config.Topology:
    return replace(topo, ascend=replace(topo.ascend, **changes))


def _line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if needle in line)
