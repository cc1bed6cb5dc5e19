"""The stand-in vLLM engine: pure parts without processes, then real processes.

Process tests start real ``python -m pdsupervisord.engine`` servers on
127.0.0.1 with short load times; fixtures kill every process they started.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from engine_helpers import (
    MODEL,
    Engine,
    Launcher,
    free_port,
    free_port_run,
    gone,
    port_accepts,
    wait_until,
)

from pdsupervisord.engine.cli import parse_serve_args
from pdsupervisord.engine.devices import DeviceLocks, lock_path, visible_devices
from pdsupervisord.engine.errors import (
    DeviceBusyError,
    EngineConfigError,
    RequestError,
)
from pdsupervisord.engine.faults import Faults, parse_faults
from pdsupervisord.engine.generate import MEDIA_TOKENS, complete, kv_blocks
from pdsupervisord.engine.knobs import load_knobs
from pdsupervisord.engine.kvconfig import (
    advertised_host,
    parse_kv_transfer_config,
    side_channel,
)
from pdsupervisord.engine.protocol import Endpoint, parse_request
from pdsupervisord.engine.scheduler import Scheduler

pytestmark = pytest.mark.timeout(60)

KEY = "sk-standin"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEED_FLAGS = (
    "--no-enable-prefix-caching",
    "--seed",
    "1024",
    "--served-model-name",
    "qwen25vl",
    "alias",
    "--max-model-len",
    "512",
    "--max-num-batched-tokens",
    "40000",
    "--trust-remote-code",
    "--gpu-memory-utilization",
    "0.9",
    "--enforce-eager",
)
LLMDD_MODULE = "vllm_ascend.distributed.llmdatadist_c_mgr_connector"
CHAT = {"model": "qwen25vl", "messages": [{"role": "user", "content": "Hi there"}]}


def llmdd_config(role: str) -> str:
    """The seed guide's --kv-transfer-config with ``role``."""
    return json.dumps(
        {
            "kv_connector": "LLMDataDistCMgrConnector",
            "kv_buffer_device": "npu",
            "kv_role": role,
            "kv_parallel_size": 1,
            "kv_port": "20001",
            "engine_id": "0",
            "kv_connector_module_path": LLMDD_MODULE,
        }
    )


# --------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------


def test_serve_args_take_the_seed_command_line_and_ignore_unknown_flags() -> None:
    args = parse_serve_args(["serve", MODEL, "--port", "13700", *SEED_FLAGS], {})

    assert args.model == MODEL
    assert args.served_model_names == ("qwen25vl", "alias")
    assert (args.port, args.max_model_len, args.seed) == (13700, 512, 1024)
    assert "--gpu-memory-utilization" in args.ignored
    assert "0.9" in args.ignored


def test_serve_args_accept_model_flag_and_api_key_from_environment() -> None:
    args = parse_serve_args(
        ["serve", "--gpu-memory-utilization", "0.9", "--model", "/m"],
        {"VLLM_API_KEY": "k"},
    )

    assert (args.model, args.served_model_names, args.api_key) == ("/m", ("/m",), "k")


def test_serve_args_without_a_model_exit_2() -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse_serve_args(["serve", "--port", "1"], {})
    assert exc_info.value.code == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", Faults()),
        ("crash_at_start", Faults(crash_at_start=True)),
        ("exit_after=3, reuseport", Faults(exit_after=3, reuseport=True)),
        ("die_midstream=0,engine_setsid", Faults(die_midstream=0, engine_setsid=True)),
    ],
)
def test_fault_switches_parse(text: str, expected: Faults) -> None:
    assert parse_faults({"PDSD_ENGINE_FAULT": text}) == expected


@pytest.mark.parametrize("text", ["crash", "exit_after", "exit_after=x", "reuseport=1"])
def test_unknown_or_malformed_fault_switch_is_an_error(text: str) -> None:
    with pytest.raises(EngineConfigError, match="PDSD_ENGINE_FAULT"):
        parse_faults({"PDSD_ENGINE_FAULT": text})


def test_knobs_have_documented_defaults_and_reject_bad_values() -> None:
    knobs = load_knobs({})
    assert (knobs.load_seconds, knobs.token_seconds, knobs.kv_timeout) == (1.0, 0, 120)
    assert knobs.death_exit_seconds == 5.0
    assert knobs.lock_dir.name == "pdsupervisord-engine-locks"

    with pytest.raises(EngineConfigError, match="PDSD_ENGINE_TOKEN_SECONDS"):
        load_knobs({"PDSD_ENGINE_TOKEN_SECONDS": "-1"})


@pytest.mark.parametrize(
    ("connector", "env", "ports"),
    [
        ("NixlConnector", {"VLLM_NIXL_SIDE_CHANNEL_PORT": "5700"}, (5700, 5701)),
        ("NixlConnector", {}, (5600, 5601)),
        (
            "LLMDataDistCMgrConnector",
            {"VLLM_ASCEND_LLMDD_RPC_PORT": "5959"},
            (5959, 5960),
        ),
        ("LLMDataDistCMgrConnector", {"VLLM_LLMDD_RPC_PORT": "5959"}, (5557, 5558)),
        ("MooncakeConnectorV1", {}, (20001, 20002)),
    ],
)
def test_side_channel_ports_follow_each_connector(
    connector: str, env: dict[str, str], ports: tuple[int, ...]
) -> None:
    config = parse_kv_transfer_config(
        {"kv_connector": connector, "kv_role": "kv_producer", "kv_port": "20001"}
    )

    assert side_channel(config, env, "0.0.0.0", tp_size=2).ports == ports


def test_llmdatadist_rejects_kv_both() -> None:
    with pytest.raises(EngineConfigError, match="kv_both"):
        parse_kv_transfer_config(
            {"kv_connector": "LLMDataDistCMgrConnector", "kv_role": "kv_both"}
        )


def test_advertised_host_prefers_vllm_host_ip_then_hccl_then_host() -> None:
    both = {"VLLM_HOST_IP": "10.0.0.1", "HCCL_IF_IP": "10.0.0.2"}
    assert advertised_host(both, "0.0.0.0") == "10.0.0.1"
    assert advertised_host({"HCCL_IF_IP": "10.0.0.2"}, "0.0.0.0") == "10.0.0.2"
    assert advertised_host({}, "192.0.0.1") == "192.0.0.1"
    assert advertised_host({}, "0.0.0.0") == "127.0.0.1"


def test_nixl_side_channel_host_comes_first() -> None:
    config = parse_kv_transfer_config(
        {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}
    )
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.1.1", "VLLM_HOST_IP": "10.0.0.1"}

    assert side_channel(config, env, "0.0.0.0", tp_size=1).host == "10.1.1.1"


def test_visible_devices_prefer_ascend_over_cuda() -> None:
    env = {"ASCEND_RT_VISIBLE_DEVICES": "2, 3", "CUDA_VISIBLE_DEVICES": "0"}
    assert visible_devices(env) == ("2", "3")
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0"}) == ("0",)
    assert visible_devices({}) == ()


def test_device_lock_held_elsewhere_names_device_and_holder(tmp_path: Path) -> None:
    holder, contender = DeviceLocks(), DeviceLocks()
    holder.acquire(tmp_path, ("4",))
    try:
        with pytest.raises(DeviceBusyError) as exc_info:
            contender.acquire(tmp_path, ("5", "4"))
        assert (exc_info.value.device, exc_info.value.holder_pid) == ("4", os.getpid())
        contender.acquire(tmp_path, ("5",))  # released after the failure
    finally:
        holder.release()
        contender.release()


def test_completion_is_deterministic_and_honours_token_limits() -> None:
    prompt = [1, 2, 3]
    assert complete(prompt, 0, 100) == complete(prompt, 0, 100)
    assert complete(prompt, 0, 100) != complete(prompt, 1, 100)

    capped = complete(prompt, 0, 3)
    assert (len(capped.tokens), capped.finish_reason) == (3, "length")
    floored = complete(prompt, 0, 400, min_tokens=300)
    assert (len(floored.tokens), floored.finish_reason) == (300, "stop")
    assert complete(prompt, 0, 50, ignore_eos=True).finish_reason == "length"


def test_kv_blocks_chain_so_an_early_difference_changes_every_block() -> None:
    prompt = list(range(40))
    blocks = kv_blocks(prompt)

    assert len(blocks) == 3
    assert kv_blocks([99, *prompt[1:]])[2] != blocks[2]
    assert kv_blocks(prompt[:32]) == blocks[:2]


def user_says(*parts: dict[str, Any]) -> dict[str, Any]:
    """A chat body with one user message made of ``parts``."""
    return {"messages": [{"role": "user", "content": list(parts)}]}


def test_image_parts_count_as_media_tokens() -> None:
    text = {"type": "text", "text": "What is this?"}
    image = {"type": "image_url", "image_url": {"url": "http://192.0.2.1/a.png"}}

    text_only = parse_request(Endpoint.CHAT, user_says(text))
    with_image = parse_request(Endpoint.CHAT, user_says(image, text))

    assert with_image.media_parts == 1
    assert len(with_image.prompt) == len(text_only.prompt) + MEDIA_TOKENS


def test_scheduler_runs_max_num_seqs_and_queues_the_rest() -> None:
    async def scenario() -> tuple[int, int, int]:
        scheduler = Scheduler(max_num_seqs=1)
        release = asyncio.Event()

        async def request() -> None:
            async with scheduler.slot(kv_blocks=2):
                await release.wait()

        tasks = [asyncio.create_task(request()) for _ in range(3)]
        await asyncio.sleep(0.01)
        seen = (scheduler.running, scheduler.waiting, scheduler.running_blocks)
        release.set()
        await asyncio.gather(*tasks)
        assert (scheduler.running, scheduler.waiting) == (0, 0)
        return seen

    assert asyncio.run(scenario()) == (1, 2, 2)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (Endpoint.CHAT, {"messages": []}),
        (Endpoint.CHAT, {"messages": [{"content": "no role"}]}),
        (Endpoint.CHAT, {"messages": [{"role": "user", "content": [{"type": "x"}]}]}),
        (Endpoint.COMPLETIONS, {}),
        (Endpoint.COMPLETIONS, {"prompt": "a", "max_tokens": 0}),
        (Endpoint.COMPLETIONS, {"prompt": "a", "max_tokens": "3"}),
        (Endpoint.COMPLETIONS, {"prompt": "a", "max_tokens": 2, "min_tokens": 3}),
        (Endpoint.COMPLETIONS, {"prompt": "a", "stream_options": {}}),
        (Endpoint.COMPLETIONS, {"prompt": ["a", "b"]}),
        (Endpoint.COMPLETIONS, {"prompt": "a", "n": 2}),
        (
            Endpoint.COMPLETIONS,
            {
                "prompt": "a",
                "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "h"},
            },
        ),
    ],
)
def test_invalid_requests_are_400(endpoint: Endpoint, body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as exc_info:
        parse_request(endpoint, body)
    assert exc_info.value.status == 400


# --------------------------------------------------------------------------
# Fixtures for processes
# --------------------------------------------------------------------------


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts engines; kills all of them, and what they left, at teardown."""
    launched = Launcher(tmp_path)
    try:
        yield launched
    finally:
        launched.cleanup()


@pytest.fixture(scope="module")
def module_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Like ``launcher``, for engines shared by a module's tests."""
    launched = Launcher(tmp_path_factory.mktemp("engines"))
    try:
        yield launched
    finally:
        launched.cleanup()


@pytest.fixture(scope="module")
def engine(module_launcher: Launcher) -> Engine:
    """One plain engine with the seed's flags, an API key and device 0."""
    started = module_launcher.start(
        *SEED_FLAGS, "--api-key", KEY, env={"ASCEND_RT_VISIBLE_DEVICES": "0"}
    )
    started.wait_healthy()
    return started


@pytest.fixture(scope="module")
def pd_pair(module_launcher: Launcher) -> tuple[Engine, Engine]:
    """A producer and a consumer, LLMDataDist-configured as in the seed guide."""
    common = ("--served-model-name", "qwen25vl", "--kv-transfer-config")
    prefill = module_launcher.start(
        *common,
        llmdd_config("kv_producer"),
        env={
            "ASCEND_RT_VISIBLE_DEVICES": "1",
            "HCCL_IF_IP": "127.0.0.1",
            "VLLM_ASCEND_LLMDD_RPC_PORT": str(free_port()),
            "PDSD_ENGINE_KV_TIMEOUT": "3",
        },
    )
    decode = module_launcher.start(
        *common,
        llmdd_config("kv_consumer"),
        env={
            "ASCEND_RT_VISIBLE_DEVICES": "2",
            "HCCL_IF_IP": "127.0.0.1",
            "VLLM_ASCEND_LLMDD_RPC_PORT": str(free_port()),
        },
    )
    prefill.wait_healthy()
    decode.wait_healthy()
    return prefill, decode


def prefill_leg(body: dict[str, Any]) -> dict[str, Any]:
    """The proxy's rewrite of ``body`` for the prefiller (facts §4, step 1)."""
    leg = {k: v for k, v in body.items() if k != "stream_options"}
    leg.update(
        stream=False,
        max_tokens=1,
        min_tokens=1,
        kv_transfer_params={
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    )
    return leg


# --------------------------------------------------------------------------
# One engine serving
# --------------------------------------------------------------------------


def test_health_and_metrics_need_no_api_key_but_v1_does(engine: Engine) -> None:
    assert engine.request("GET", "/health").status == 200
    assert engine.request("GET", "/health").body == b""
    assert engine.request("GET", "/metrics").status == 200
    assert engine.request("GET", "/v1/models").status == 401
    assert engine.post("/v1/completions", {"prompt": "x"}).status == 401


def test_models_lists_every_served_name(engine: Engine) -> None:
    reply = engine.request("GET", "/v1/models", headers=AUTH).json()

    assert reply["object"] == "list"
    assert [m["id"] for m in reply["data"]] == ["qwen25vl", "alias"]
    assert reply["data"][0]["root"] == MODEL


def test_completion_answers_openai_json_and_logs_the_request_id(engine: Engine) -> None:
    reply = engine.post(
        "/v1/completions",
        {"model": "alias", "prompt": "The capital of France is", "max_tokens": 4},
        {**AUTH, "X-Request-Id": "cmp-1"},
    )

    body = reply.json()
    assert reply.status == 200
    assert "X-Request-Id" not in reply.headers  # vLLM echoes it only on request
    assert (body["id"], body["object"], body["model"]) == (
        "cmpl-cmp-1",
        "text_completion",
        "alias",
    )
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["text"].split()) == 4
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 4,
        "total_tokens": 9,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    engine.wait_event("request.received", request_id="cmpl-cmp-1")


def test_chat_answers_an_assistant_message(engine: Engine) -> None:
    reply = engine.post(
        "/v1/chat/completions",
        {**CHAT, "max_completion_tokens": 2},
        {**AUTH, "X-Request-Id": "chat-1"},
    )

    body = reply.json()
    assert body["id"] == "chatcmpl-chat-1"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 2
    assert body["kv_transfer_params"] is None


def test_generation_without_max_tokens_stops_by_itself(engine: Engine) -> None:
    body = engine.post("/v1/chat/completions", CHAT, AUTH).json()

    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_answer_is_sse_with_usage_and_done(engine: Engine, path: str) -> None:
    body = {"max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"prompt": "Hi there"} if "chat" not in path else CHAT

    stream = engine.stream(path, body, {**AUTH, "X-Request-Id": "s-1"})

    assert stream.status == 200 and stream.complete
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    chunks = stream.chunks()
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    token_chunks = [c for c in chunks[:-1] if _chunk_text(c)]
    assert len(token_chunks) == 3
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = engine.post(path, {**body, "stream": False, "stream_options": None}, AUTH)
    assert "".join(_chunk_text(c) for c in chunks[:-1]) == _body_text(whole.json())


def test_image_url_is_counted_and_never_fetched(engine: Engine) -> None:
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.setblocking(False)
        url = f"http://127.0.0.1:{trap.getsockname()[1]}/qwen.png"
        body = user_says(
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is the text in the illustrate?"},
        )
        reply = engine.post("/v1/chat/completions", {**body, "max_tokens": 2}, AUTH)

        assert reply.status == 200
        assert reply.json()["usage"]["prompt_tokens"] > MEDIA_TOKENS
        with pytest.raises(BlockingIOError):
            trap.accept()


def test_same_prompt_and_seed_give_the_same_text(engine: Engine) -> None:
    def text(seed: int) -> str:
        body = {"prompt": "determinism", "max_tokens": 8, "seed": seed}
        return str(
            engine.post("/v1/completions", body, AUTH).json()["choices"][0]["text"]
        )

    assert text(7) == text(7)
    assert text(7) != text(8)


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "NotFoundError"),
        (b"{not json", 400, "BadRequestError"),
        ({"prompt": 5}, 400, "BadRequestError"),
        ({"prompt": "x", "max_tokens": 600}, 400, "BadRequestError"),
    ],
)
def test_bad_requests_get_vllm_error_json(
    engine: Engine, body: object, status: int, error_type: str
) -> None:
    reply = engine.post("/v1/completions", body, AUTH)

    assert reply.status == status
    assert reply.json()["error"]["type"] == error_type
    assert reply.json()["error"]["code"] == status


def test_metrics_use_vllm_names_and_count_tokens(engine: Engine) -> None:
    before = engine.metric("vllm:generation_tokens_total")
    engine.post("/v1/completions", {"prompt": "count me", "max_tokens": 5}, AUTH)

    assert engine.metric("vllm:generation_tokens_total") == before + 5
    text = engine.request("GET", "/metrics").body.decode()
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
    ):
        assert name in text
    assert 'model_name="qwen25vl"' in text and 'engine="0"' in text


def test_engine_child_is_named_like_vllm_and_shares_the_process_group(
    engine: Engine,
) -> None:
    child = engine.engine_child()

    assert child.name() == "VLLM::EngineCor"
    assert os.getpgid(child.pid) == os.getpgid(engine.pid)
    (worker,) = child.children()
    assert worker.name() == "VLLM::Worker"
    assert os.getpgid(worker.pid) == os.getpgid(engine.pid)


def test_request_id_header_is_echoed_only_with_its_flag(launcher: Launcher) -> None:
    engine = launcher.start("--enable-request-id-headers")
    engine.wait_healthy()

    body = {"prompt": "hi", "max_tokens": 1}
    given = engine.post("/v1/completions", body, {"X-Request-Id": "echo-1"})
    made_up = engine.post("/v1/completions", body)

    assert given.headers["X-Request-Id"] == "echo-1"
    assert len(made_up.headers["X-Request-Id"]) == 32


def test_second_engine_on_a_held_device_exits_1_naming_it(
    engine: Engine, module_launcher: Launcher
) -> None:
    second = module_launcher.start(env={"ASCEND_RT_VISIBLE_DEVICES": "0"})

    assert second.wait_exit() == 1
    busy = second.wait_event("engine.device_busy")
    assert busy["device"] == "0"
    assert busy["holder_pid"] == engine.engine_child().pid
    assert "device 0 is in use" in second.log()


def test_engine_on_a_taken_port_exits_1(
    engine: Engine, module_launcher: Launcher
) -> None:
    second = module_launcher.start(
        port=engine.port, env={"ASCEND_RT_VISIBLE_DEVICES": "9"}
    )

    assert second.wait_exit() == 1
    assert (
        "address already in use"
        in second.wait_event("api.bind_failed")["error"].lower()
    )
    # The port is bound before the load, as in vLLM 0.32: no engine was started.
    assert not second.events("engine.spawned")


# --------------------------------------------------------------------------
# Prefill -> decode handoff between two engines
# --------------------------------------------------------------------------


def test_pd_handoff_pulls_kv_over_the_network(pd_pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pd_pair
    headers = {"X-Request-Id": "pd-1"}
    body = {**CHAT, "max_tokens": 6}
    usage_before = prefill.metric("vllm:kv_cache_usage_perc")

    first = prefill.post("/v1/chat/completions", prefill_leg(body), headers).json()
    params = first["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_host"] == "127.0.0.1"
    assert params["remote_engine_id"] == "0"
    assert (params["remote_request_id"], params["remote_tp_size"]) == ("pd-1", 1)
    assert params["remote_block_ids"]
    assert prefill.metric("vllm:kv_cache_usage_perc") > usage_before

    second = decode.post(
        "/v1/chat/completions", {**body, "kv_transfer_params": params}, headers
    ).json()
    local = decode.post("/v1/chat/completions", body).json()
    assert second["choices"][0]["message"] == local["choices"][0]["message"]
    assert second["choices"][0]["message"]["content"].startswith(
        first["choices"][0]["message"]["content"]
    )

    decode.wait_event("kv.pulled", request_id="pd-1")
    prefill.wait_event("kv.pull_served", request_id="pd-1")
    prefill.wait_event("kv.freed", request_id="pd-1", reason="pulled")
    for side in pd_pair:
        side.wait_event("request.received", request_id="chatcmpl-pd-1")
    assert prefill.metric("vllm:kv_cache_usage_perc") == usage_before


def test_pd_handoff_streams_from_the_decoder(pd_pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pd_pair
    headers = {"X-Request-Id": "pd-stream"}
    body = {"model": "qwen25vl", "prompt": "stream me", "max_tokens": 4, "stream": True}

    params = prefill.post("/v1/completions", prefill_leg(body), headers).json()[
        "kv_transfer_params"
    ]
    stream = decode.stream(
        "/v1/completions", {**body, "kv_transfer_params": params}, headers
    )

    assert stream.complete
    assert len([c for c in stream.chunks() if _chunk_text(c)]) == 4


def test_decode_leg_fails_500_when_the_producer_is_unreachable(
    pd_pair: tuple[Engine, Engine],
) -> None:
    _, decode = pd_pair
    params = {
        "do_remote_prefill": True,
        "remote_host": "127.0.0.1",
        "remote_port": free_port(),
        "remote_block_ids": [1],
    }

    reply = decode.post(
        "/v1/chat/completions",
        {**CHAT, "kv_transfer_params": params},
        {"X-Request-Id": "broken-link"},
    )

    assert reply.status == 500
    assert "KV transfer failed" in reply.json()["error"]["message"]
    decode.wait_event("kv.pull_failed", request_id="broken-link")


def test_kv_blocks_can_be_pulled_once_only(pd_pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pd_pair
    headers = {"X-Request-Id": "pd-twice"}
    params = prefill.post("/v1/chat/completions", prefill_leg(CHAT), headers).json()[
        "kv_transfer_params"
    ]
    request = {**CHAT, "max_tokens": 2, "kv_transfer_params": params}

    assert decode.post("/v1/chat/completions", request, headers).status == 200
    again = decode.post("/v1/chat/completions", request, headers)

    assert again.status == 500
    assert "unknown KV blocks" in again.json()["error"]["message"]


def test_kv_of_another_prompt_is_rejected(pd_pair: tuple[Engine, Engine]) -> None:
    prefill, decode = pd_pair
    headers = {"X-Request-Id": "pd-mismatch"}
    params = prefill.post("/v1/chat/completions", prefill_leg(CHAT), headers).json()[
        "kv_transfer_params"
    ]
    other = {"model": "qwen25vl", "messages": [{"role": "user", "content": "Other"}]}

    reply = decode.post(
        "/v1/chat/completions", {**other, "kv_transfer_params": params}, headers
    )

    assert reply.status == 500
    assert "do not match" in reply.json()["error"]["message"]


def test_unpulled_kv_is_freed_after_the_kv_timeout(
    pd_pair: tuple[Engine, Engine],
) -> None:
    prefill, decode = pd_pair
    headers = {"X-Request-Id": "pd-expire"}
    params = prefill.post("/v1/chat/completions", prefill_leg(CHAT), headers).json()[
        "kv_transfer_params"
    ]

    prefill.wait_event("kv.freed", request_id="pd-expire", reason="expired")
    reply = decode.post(
        "/v1/chat/completions", {**CHAT, "kv_transfer_params": params}, headers
    )
    assert reply.status == 500


def test_done_for_another_request_id_leaves_blocks_pinned(
    pd_pair: tuple[Engine, Engine],
) -> None:
    prefill, decode = pd_pair
    usage_before = prefill.metric("vllm:kv_cache_usage_perc")
    params = prefill.post(
        "/v1/chat/completions", prefill_leg(CHAT), {"X-Request-Id": "pd-p-id"}
    ).json()["kv_transfer_params"]
    # An old proxy drops remote_request_id and gives the decoder another id.
    del params["remote_request_id"]

    reply = decode.post(
        "/v1/chat/completions",
        {**CHAT, "kv_transfer_params": params},
        {"X-Request-Id": "pd-d-id"},
    )

    assert reply.status == 200
    prefill.wait_event("kv.done_for_unknown_request", request_id="pd-d-id")
    assert prefill.metric("vllm:kv_cache_usage_perc") > usage_before


def test_nixl_engine_serves_kv_on_one_port_per_tensor_parallel_rank(
    launcher: Launcher,
) -> None:
    base = free_port_run(2)  # tp 2: the side channel binds base and base + 1
    config = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
    engine = launcher.start(
        "--tensor-parallel-size",
        "2",
        "--kv-transfer-config",
        config,
        env={
            "CUDA_VISIBLE_DEVICES": "6,7",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(base),
        },
    )
    engine.wait_healthy()

    body = prefill_leg({"prompt": "hello"})
    headers = {"X-Request-Id": "nixl-1"}
    params = engine.post("/v1/completions", body, headers).json()["kv_transfer_params"]
    assert (params["remote_port"], params["tp_size"]) == (base, 2)
    # vLLM 0.32's NixlConnector: one block list per KV cache group, blocks
    # keyed by vLLM's internal id, no remote_tp_size.
    assert len(params["remote_block_ids"]) == 1 and params["remote_block_ids"][0]
    assert params["remote_request_id"].startswith("cmpl-nixl-1-")
    assert params["transfer_mode"] == "pull" and "remote_tp_size" not in params
    assert engine.wait_event("kv.listening")["ports"] == [base, base + 1]
    assert engine.wait_event("engine.devices_locked")["devices"] == ["6", "7"]


# --------------------------------------------------------------------------
# Process life: start-up, signals, deaths
# --------------------------------------------------------------------------


def test_port_refuses_connections_during_load_then_health_is_200(
    launcher: Launcher,
) -> None:
    engine = launcher.start(load_seconds=1.5)

    engine.wait_event("engine.devices_locked")
    assert not port_accepts(engine.port)
    engine.wait_healthy()


def test_sigkill_of_api_server_leaves_engine_child_holding_lock_and_kv_port(
    launcher: Launcher,
) -> None:
    kv_port = free_port()
    engine = launcher.start(
        "--kv-transfer-config",
        llmdd_config("kv_producer"),
        env={
            "ASCEND_RT_VISIBLE_DEVICES": "3",
            "VLLM_ASCEND_LLMDD_RPC_PORT": str(kv_port),
        },
    )
    engine.wait_healthy()
    child = engine.engine_child()

    os.kill(engine.pid, signal.SIGKILL)
    assert engine.wait_exit() == -signal.SIGKILL

    engine.wait_event("engine.orphaned")
    assert child.is_running() and not gone(child.pid)
    assert not port_accepts(engine.port)
    assert port_accepts(kv_port)
    with lock_path(launcher.lock_dir, "3").open("r+") as lock:
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert int(lock.read()) == child.pid
    child.kill()


def test_engine_child_death_turns_health_503_then_api_server_exits_0(
    launcher: Launcher,
) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_DEATH_EXIT_SECONDS": "1"})
    engine.wait_healthy()

    engine.engine_child().kill()
    killed_at = time.monotonic()
    wait_until(lambda: engine.health() == 503, timeout=2.0)
    assert time.monotonic() - killed_at < 1.0

    assert engine.wait_exit() == 0
    assert time.monotonic() - killed_at >= 0.9
    assert engine.wait_event("api.engine_died")["engine_exit_code"] == -signal.SIGKILL


def test_engine_child_death_ends_its_worker_too(launcher: Launcher) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_DEATH_EXIT_SECONDS": "3"})
    engine.wait_healthy()
    child = engine.engine_child()
    (worker,) = child.children()

    child.kill()

    wait_until(lambda: gone(worker.pid), timeout=3.0)
    assert engine.wait_exit() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_after_start_exits_0_leaving_no_child(
    launcher: Launcher, signum: signal.Signals
) -> None:
    engine = launcher.start()
    engine.wait_healthy()
    child = engine.engine_child()

    sent_at = time.monotonic()
    os.kill(engine.pid, signum)

    assert engine.wait_exit() == 0
    assert time.monotonic() - sent_at < 2.0
    assert gone(child.pid)


def test_sigterm_during_load_exits_130(launcher: Launcher) -> None:
    engine = launcher.start(load_seconds=30)
    child = engine.engine_child()
    engine.wait_event("engine.devices_locked")

    os.kill(engine.pid, signal.SIGTERM)

    assert engine.wait_exit() == 130
    assert gone(child.pid)


def test_taken_kv_port_hangs_start_up(launcher: Launcher) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        engine = launcher.start(
            "--kv-transfer-config",
            llmdd_config("kv_consumer"),
            env={"VLLM_ASCEND_LLMDD_RPC_PORT": str(squatter.getsockname()[1])},
        )

        engine.wait_event("kv.bind_failed")
        time.sleep(0.5)  # longer than the load time: the port must stay closed
        assert engine.process.poll() is None
        assert not port_accepts(engine.port)

        os.kill(engine.pid, signal.SIGTERM)
        assert engine.wait_exit() == 130


def test_invalid_knob_exits_1_before_spawning(launcher: Launcher) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "explode"})

    assert engine.wait_exit() == 1
    assert "explode" in engine.wait_event("api.config_invalid")["error"]


# --------------------------------------------------------------------------
# Fault switches
# --------------------------------------------------------------------------


def test_fault_crash_at_start_exits_1_without_opening_the_port(
    launcher: Launcher,
) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "crash_at_start"})
    child = engine.engine_child()

    assert engine.wait_exit() == 1
    engine.wait_event("api.model_load_failed")
    assert not engine.events("api.ready")
    assert gone(child.pid)


def test_fault_hang_at_start_never_opens_the_port(launcher: Launcher) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "hang_at_start"})

    engine.wait_event("fault.hang_at_start")
    time.sleep(0.3)
    assert not port_accepts(engine.port)
    os.kill(engine.pid, signal.SIGTERM)
    assert engine.wait_exit() == 130


def test_fault_exit_after_serves_n_requests_then_exits_1(launcher: Launcher) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "exit_after=2"})
    engine.wait_healthy()
    child = engine.engine_child()

    for _ in range(2):
        assert (
            engine.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status
            == 200
        )

    assert engine.wait_exit() == 1
    assert gone(child.pid)


def test_fault_die_midstream_cuts_the_stream_after_n_tokens(launcher: Launcher) -> None:
    engine = launcher.start(
        env={
            "PDSD_ENGINE_FAULT": "die_midstream=3",
            "PDSD_ENGINE_TOKEN_SECONDS": "0.01",
        }
    )
    engine.wait_healthy()

    stream = engine.stream(
        "/v1/completions", {"prompt": "x", "max_tokens": 10, "stream": True}
    )

    assert stream.status == 200 and not stream.complete
    assert len(stream.chunks()) == 3
    assert engine.wait_exit() == 1


def test_fault_die_midstream_kills_a_non_streamed_request(launcher: Launcher) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "die_midstream=3"})
    engine.wait_healthy()

    with pytest.raises((ConnectionError, OSError)):
        engine.post("/v1/completions", {"prompt": "x", "max_tokens": 10})
    assert engine.wait_exit() == 1


def test_fault_health_503_serves_but_reports_unhealthy(launcher: Launcher) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "health_503"})
    engine.wait_event("api.ready")

    assert engine.health() == 503
    assert (
        engine.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status == 200
    )


def test_fault_orphan_engine_leaves_the_engine_child_holding_the_device(
    launcher: Launcher,
) -> None:
    engine = launcher.start(
        env={"PDSD_ENGINE_FAULT": "orphan_engine", "ASCEND_RT_VISIBLE_DEVICES": "5"}
    )
    child = engine.engine_child()

    assert engine.wait_exit() == 1
    engine.wait_event("engine.orphaned")
    assert not gone(child.pid)
    again = launcher.start(env={"ASCEND_RT_VISIBLE_DEVICES": "5"})
    assert again.wait_exit() == 1
    assert again.wait_event("engine.device_busy")["holder_pid"] == child.pid
    child.kill()


def test_fault_engine_setsid_moves_the_child_out_of_the_group(
    launcher: Launcher,
) -> None:
    engine = launcher.start(env={"PDSD_ENGINE_FAULT": "engine_setsid"})
    engine.wait_healthy()
    child = engine.engine_child()

    assert os.getpgid(child.pid) == child.pid != os.getpgid(engine.pid)
    os.kill(engine.pid, signal.SIGTERM)
    assert engine.wait_exit() == 0
    assert gone(child.pid)


def test_fault_reuseport_lets_two_engines_share_a_port(launcher: Launcher) -> None:
    fault = {"PDSD_ENGINE_FAULT": "reuseport"}
    first = launcher.start(env=fault)
    first.wait_healthy()
    second = launcher.start(port=first.port, env=fault)

    second.wait_event("api.ready")
    assert second.process.poll() is None
    assert psutil.pid_exists(first.pid)


def _chunk_text(chunk: dict[str, Any]) -> str:
    if not chunk["choices"]:
        return ""
    choice = chunk["choices"][0]
    return str(
        choice["delta"].get("content", "") if "delta" in choice else choice["text"]
    )


def _body_text(body: dict[str, Any]) -> str:
    choice = body["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def test_kv_link_down_fails_the_pull_while_health_stays_200(
    launcher: Launcher, pd_pair: tuple[Engine, Engine]
) -> None:
    """A broken P→D link is invisible to /health (facts §5): fault kv_link_down."""
    _, decode = pd_pair
    broken = launcher.start(
        "--served-model-name",
        "qwen25vl",
        "--kv-transfer-config",
        llmdd_config("kv_producer"),
        env={
            "ASCEND_RT_VISIBLE_DEVICES": "5",
            "HCCL_IF_IP": "127.0.0.1",
            "VLLM_ASCEND_LLMDD_RPC_PORT": str(free_port()),
            "PDSD_ENGINE_FAULT": "kv_link_down",
        },
    )
    broken.wait_healthy()
    headers = {"X-Request-Id": "link-down-1"}
    body = {**CHAT, "max_tokens": 4}

    params = broken.post("/v1/chat/completions", prefill_leg(body), headers).json()
    answer = decode.post(
        "/v1/chat/completions",
        {**body, "kv_transfer_params": params["kv_transfer_params"]},
        headers,
    )
    assert answer.status == 500
    broken.wait_event("kv.link_down")
    decode.wait_event("kv.pull_failed", request_id="link-down-1")
    assert broken.health() == 200
