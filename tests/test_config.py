"""Topology errors name the file, line and key; all are reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pdsupervisord import config
from pdsupervisord.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "conf" / "demo.toml").read_text()


def _issues(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return [str(issue) for issue in info.value.issues]


def _line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    "name", ["demo.toml", "qwen25vl-1p1d.toml", "qwen25vl-2p1d.toml"]
)
def test_shipped_configs_are_valid(name: str) -> None:
    topo = config.load(ROOT / "conf" / name)
    assert topo.prefill.count >= 1 and topo.decode.count >= 1


def test_unknown_key_names_file_line_and_nearest_key(tmp_path: Path) -> None:
    text = DEMO.replace("startup_timeout = 60\nmin = 1", "startup_timout = 60\nmin = 1")
    issues = _issues(text, tmp_path)
    line = _line_of(text, "startup_timout")
    assert len(issues) == 1
    assert issues[0].startswith(
        f"{tmp_path / 'bad.toml'}:{line}: prefill.startup_timout"
    )
    assert "did you mean 'startup_timeout'" in issues[0]


def test_wrong_type_in_array_table_is_located(tmp_path: Path) -> None:
    text = DEMO.replace("port = 18101", 'port = "18101"')
    issues = _issues(text, tmp_path)
    line = _line_of(text, 'port = "18101"')
    expected = f":{line}: decode.instances[0].port: expected a port"
    assert any(expected in issue for issue in issues), issues


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    text = DEMO.replace('policy = "always"', 'policy = "sometimes"')
    text = text.replace("[model]\n", "[model]\ncolour = 1\n")
    text = text.replace("port = 18080", "port = 70000")
    issues = _issues(text, tmp_path)
    keys = {issue.split(": ")[1] for issue in issues}
    assert {"restart.policy", "model.colour", "proxy.port"} <= keys


def test_missing_required_section(tmp_path: Path) -> None:
    text = DEMO.replace("[decode]\n", "[decoder]\n").replace(
        "[[decode.instances]]", "[[decoder.instances]]"
    )
    issues = _issues(text, tmp_path)
    assert any("decode: required key is missing" in i for i in issues)
    assert any("decoder: unknown key; did you mean 'decode'" in i for i in issues)


def test_invalid_toml_reports_line(tmp_path: Path) -> None:
    text = DEMO.replace("[proxy]", "[proxy")
    issues = _issues(text, tmp_path)
    assert issues[0].startswith(f"{tmp_path / 'bad.toml'}:{_line_of(text, '[proxy')}:")
    assert "invalid TOML" in issues[0]


def test_duplicate_port_between_roles(tmp_path: Path) -> None:
    text = DEMO.replace("port = 18101", "port = 18100")
    issues = _issues(text, tmp_path)
    assert any("port 18100 on 127.0.0.1 is used by both" in i for i in issues)


def test_duplicate_device_between_roles(tmp_path: Path) -> None:
    text = DEMO.replace("devices = [1]", "devices = [0]")
    assert any(
        "device 0 on 127.0.0.1 is used by both" in i for i in _issues(text, tmp_path)
    )


def test_pool_needs_tp_devices_per_port(tmp_path: Path) -> None:
    text = DEMO.replace("devices = [2, 3]", "devices = [2]")
    assert any("prefill.pool.devices" in i for i in _issues(text, tmp_path))


def test_max_beyond_slots_is_an_error(tmp_path: Path) -> None:
    text = DEMO.replace("max = 3 ", "max = 5 ")
    assert any(
        "prefill.max: max is 5 but only 3 slots" in i for i in _issues(text, tmp_path)
    )


def test_unknown_placeholder_is_an_error(tmp_path: Path) -> None:
    text = DEMO.replace('"{served_name}"', '"{served_nme}"')
    assert any("did you mean {served_name}" in i for i in _issues(text, tmp_path))


def test_kv_typo_suggests_vllm_key(tmp_path: Path) -> None:
    text = DEMO.replace("kv_buffer_device =", "kv_bufer_device =")
    assert any("did you mean 'kv_buffer_device'" in i for i in _issues(text, tmp_path))


def test_relative_dirs_resolve_against_config_file(tmp_path: Path) -> None:
    text = DEMO.replace('"/tmp/pdsupervisord-demo/run"', '"state/run"')
    path = tmp_path / "t.toml"
    path.write_text(text)
    assert config.load(path).daemon.run_dir == tmp_path / "state" / "run"


def test_daemon_refuses_invalid_topology_and_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "spawned"
    text = DEMO.replace(
        '["{python}", "-m", "pdsupervisord.engine", "serve"]',
        f'["touch", "{marker}"]',
    ).replace("[model]\n", "[model]\nbogus = true\n")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "pdsupervisord.daemon", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert f"{path}:" in done.stderr and "model.bogus: unknown key" in done.stderr
    assert not marker.exists()


def test_empty_model_path_is_an_error(tmp_path: Path) -> None:
    text = DEMO.replace('path = "/model/Qwen2.5-VL-7B-Instruct"', 'path = ""')
    assert any("model.path: must not be empty" in i for i in _issues(text, tmp_path))


@pytest.mark.parametrize(
    "endpoint", ["tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555", "tcp://10.1.2.3:5555"]
)
def test_unauthenticated_tcp_endpoint_is_a_located_error(
    tmp_path: Path, endpoint: str
) -> None:
    text = DEMO.replace(
        "stop_timeout = 10", f'stop_timeout = 10\ncontrol = "{endpoint}"'
    )
    issues = _issues(text, tmp_path)
    line = _line_of(text, "control = ")
    assert any(
        f":{line}: daemon.control: {endpoint} has no authentication" in i
        for i in issues
    ), issues


def test_tcp_loopback_with_opt_in_is_accepted(tmp_path: Path) -> None:
    text = DEMO.replace(
        "stop_timeout = 10",
        'stop_timeout = 10\ncontrol = "tcp://127.0.0.1:5555"\n'
        "allow_tcp_loopback = true",
    )
    path = tmp_path / "t.toml"
    path.write_text(text)
    assert config.load(path).daemon.control == "tcp://127.0.0.1:5555"
