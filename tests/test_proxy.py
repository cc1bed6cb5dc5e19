"""Tests of the built-in PD proxy (`pdsupervisord.proxy`).

Pure parts (backend pools, protocol shapes, CLI parsing, membership bodies)
are tested directly. End-to-end tests run the proxy as a real subprocess in
front of in-process mock prefill and decode backends on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from engine_helpers import Engine, Launcher, port_accepts
from engine_helpers import wait_until as engine_wait_until
from proxy_helpers import (
    DIE_BEFORE_FIRST,
    DIE_MIDSTREAM,
    HANG,
    NO_DONE,
    NO_KV,
    OK,
    STATUS_400,
    STATUS_500,
    Cluster,
    MockBackend,
    ProxyProcess,
    dead_address,
    free_port,
    sse_data,
    wait_until,
)

import pdsupervisord.proxy
from pdsupervisord.proxy import protocol
from pdsupervisord.proxy.admin import parse_membership
from pdsupervisord.proxy.backends import (
    Address,
    Backend,
    BackendState,
    EjectedBy,
    Pool,
    Role,
    outstanding_requests,
    outstanding_work,
)
from pdsupervisord.proxy.cli import event_loop_runner, parse_settings
from pdsupervisord.proxy.errors import BadRequestError
from pdsupervisord.proxy.health import ProbeSettings
from pdsupervisord.proxy.timings import LatencyHistogram

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret-test-token"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PREFILL_REQUEST_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 50,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


def completion_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": "Once",
        "max_tokens": 20,
        "stream": stream,
        **extra,
    }


# --- backend pools ---------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_pool(
    role: Role = Role.PREFILL, count: int = 3, clock: FakeClock | None = None
) -> tuple[Pool, list[Address]]:
    key = outstanding_work if role is Role.PREFILL else outstanding_requests
    pool = Pool(role, key, cooldown=5.0, clock=clock or FakeClock())
    addresses = [Address("10.0.0.1", 8100 + i) for i in range(count)]
    for address in addresses:
        pool.add(address)
    return pool, addresses


def test_prefill_pick_prefers_least_outstanding_prompt_bytes() -> None:
    pool, (a, b, c) = make_pool()
    big = pool.acquire(weight=1000)
    small = pool.acquire(weight=10)
    assert big is not None and small is not None

    third = pool.acquire(weight=500)
    assert third is not None
    assert {big.backend.address, small.backend.address, third.backend.address} == {
        a,
        b,
        c,
    }
    fourth = pool.acquire(weight=1)
    assert fourth is not None
    assert fourth.backend is small.backend


def test_decode_pick_prefers_fewest_in_flight_requests() -> None:
    pool, _ = make_pool(Role.DECODE, count=2)
    first = pool.acquire(weight=10_000)
    second = pool.acquire()
    assert first is not None and second is not None
    assert first.backend is not second.backend

    first.release()
    third = pool.acquire()
    assert third is not None
    assert third.backend is first.backend


def test_ties_are_broken_round_robin() -> None:
    pool, addresses = make_pool(count=3)
    picked = []
    for _ in range(6):
        lease = pool.acquire(weight=5)
        assert lease is not None
        picked.append(lease.backend.address)
        lease.release()
    assert picked == addresses * 2


def test_lease_release_is_idempotent_and_restores_counters() -> None:
    pool, _ = make_pool(count=1)
    lease = pool.acquire(weight=42)
    assert lease is not None
    with lease:
        assert (lease.backend.in_flight, lease.backend.load) == (1, 42)
    lease.release()
    assert (lease.backend.in_flight, lease.backend.load) == (0, 0)


def test_exclude_skips_tried_backends() -> None:
    pool, (a, b) = make_pool(count=2)
    lease = pool.acquire(exclude=frozenset({a}))
    assert lease is not None and lease.backend.address == b
    assert pool.acquire(exclude=frozenset({a, b})) is None


def test_remove_idle_backend_leaves_at_once() -> None:
    pool, (a, _b) = make_pool(count=2)
    assert pool.remove(a) is not None
    assert pool.get(a) is None
    assert pool.remove(a) is None


def test_remove_busy_backend_drains_then_leaves() -> None:
    pool, (a, b) = make_pool(count=2)
    lease = pool.acquire(exclude=frozenset({b}))
    assert lease is not None and lease.backend.address == a

    backend = pool.remove(a)
    assert backend is not None and backend.state is BackendState.DRAINING
    for _ in range(3):
        other = pool.acquire()
        assert other is not None and other.backend.address == b
        other.release()

    lease.release()
    assert pool.get(a) is None


def test_prefiller_stays_until_the_decoder_is_done_with_its_kv() -> None:
    """A drained P must outlive the D legs that still pull KV from it."""
    pool, (a, b) = make_pool(count=2)
    lease = pool.acquire(weight=100, exclude=frozenset({b}))
    assert lease is not None and lease.backend.address == a

    kv_done = lease.hand_off()
    assert lease.backend.in_flight == 0 and lease.backend.load == 0
    pool.remove(a)
    assert pool.get(a) is lease.backend  # still held for the decoder

    kv_done()
    kv_done()  # idempotent
    assert pool.get(a) is None


def test_readding_a_draining_backend_reactivates_it() -> None:
    pool, _ = make_pool(count=2)
    lease = pool.acquire()
    assert lease is not None
    address = lease.backend.address
    pool.remove(address)

    backend = pool.add(address)
    assert backend is lease.backend
    assert backend.state is BackendState.ACTIVE
    lease.release()
    assert pool.get(address) is backend


def test_refused_backend_is_ejected_then_tried_half_open() -> None:
    clock = FakeClock()
    pool, (a,) = make_pool(count=1, clock=clock)
    backend = pool.get(a)
    assert backend is not None

    backend.mark_unreachable("refused")
    assert backend.state is BackendState.EJECTED
    assert pool.acquire() is None

    clock.now += 5.0
    trial = pool.acquire()
    assert trial is not None
    assert pool.acquire() is None, "only one half-open try at a time"
    trial.release()

    trial = pool.acquire()
    assert trial is not None
    backend.mark_reachable()
    trial.release()
    assert backend.view().state is BackendState.ACTIVE
    assert backend.errors["refused"] == 1


def test_failed_half_open_try_restarts_the_cooldown() -> None:
    clock = FakeClock()
    pool, (a,) = make_pool(count=1, clock=clock)
    backend = pool.get(a)
    assert backend is not None
    backend.mark_unreachable("refused")
    clock.now += 5.0

    with pool.acquire() as trial:  # type: ignore[union-attr]
        trial.backend.mark_unreachable("refused")
    assert pool.acquire() is None
    clock.now += 5.0
    assert pool.acquire() is not None


def _member(pool: Pool, address: Address) -> Backend:
    backend = pool.get(address)
    assert backend is not None
    return backend


def test_failing_probes_eject_until_enough_pass_again() -> None:
    clock = FakeClock()
    pool, (a, b) = make_pool(count=2, clock=clock)
    backend = _member(pool, a)

    for _ in range(2):
        backend.probe_failed("bad_status", "/health answered 503", 3)
    assert backend.state is BackendState.ACTIVE and backend.healthy
    backend.probe_failed("bad_status", "/health answered 503", 3)
    assert (backend.state, backend.ejected_by) == (
        BackendState.EJECTED,
        EjectedBy.PROBE,
    )
    assert not backend.healthy and backend.ejections == {"probe": 1}

    clock.now += 3600  # no half-open try: only the probe brings it back
    backend.mark_reachable()  # nor does an answer to an older request
    for _ in range(3):
        lease = pool.acquire()
        assert lease is not None and lease.backend.address == b
        lease.release()

    backend.probe_passed(2)
    assert backend.state is BackendState.EJECTED
    backend.probe_passed(2)
    assert backend.state is BackendState.ACTIVE and backend.healthy
    assert backend.ejected_by is None
    assert backend.probes == {"bad_status": 3, "ok": 2}


def test_a_pass_between_failures_resets_the_count() -> None:
    pool, (a,) = make_pool(count=1)
    backend = _member(pool, a)
    for _ in range(5):
        backend.probe_failed("timeout", "no answer", 2)
        backend.probe_passed(1)
    assert backend.state is BackendState.ACTIVE and backend.healthy


def test_passing_probe_ends_a_connection_ejection_before_its_cooldown() -> None:
    pool, (a,) = make_pool(count=1)
    backend = _member(pool, a)
    backend.mark_unreachable("refused")
    assert backend.ejected_by is EjectedBy.CONNECTION
    assert pool.acquire() is None

    backend.probe_passed(2)
    assert backend.state is BackendState.ACTIVE
    assert pool.acquire() is not None


def test_probe_failing_on_a_connection_ejected_backend_keeps_it_out() -> None:
    clock = FakeClock()
    pool, (a,) = make_pool(count=1, clock=clock)
    backend = _member(pool, a)
    backend.mark_unreachable("refused")
    backend.probe_failed("refused", "cannot connect", 1)

    assert backend.ejected_by is EjectedBy.PROBE
    clock.now += 3600
    assert pool.acquire() is None, "no half-open try while the probe fails"


def test_draining_backend_stays_draining_and_comes_back_ejected_if_unhealthy() -> None:
    pool, (a, _b) = make_pool(count=2)
    lease = pool.acquire()
    assert lease is not None and lease.backend.address == a
    backend = pool.remove(a)
    assert backend is not None

    backend.probe_failed("refused", "cannot connect", 1)
    assert backend.state is BackendState.DRAINING and not backend.healthy

    pool.add(a)
    assert (backend.state, backend.ejected_by) == (
        BackendState.EJECTED,
        EjectedBy.PROBE,
    )
    lease.release()
    assert pool.get(a) is backend


def test_avoided_backends_are_picked_only_when_nothing_else_is_left() -> None:
    pool, (a, b) = make_pool(count=2)
    for _ in range(3):
        lease = pool.acquire(avoid=frozenset({a}))
        assert lease is not None and lease.backend.address == b
        lease.release()
    lease = pool.acquire(exclude=frozenset({b}), avoid=frozenset({a}))
    assert lease is not None and lease.backend.address == a


def test_latency_histogram_counts_cumulatively() -> None:
    histogram = LatencyHistogram((0.01, 0.1))
    for seconds in (0.001, 0.01, 0.05, 3.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.01", 2), ("0.1", 3), ("+Inf", 4)]
    assert histogram.count == 4 and histogram.sum == pytest.approx(3.061)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8100", Address("127.0.0.1", 8100)),
        ("node-3:13700", Address("node-3", 13700)),
        ("[::1]:8000", Address("::1", 8000)),
    ],
)
def test_address_parses_host_and_port(text: str, expected: Address) -> None:
    address = Address.parse(text)
    assert address == expected
    assert str(address) == text


@pytest.mark.parametrize("text", ["8100", ":8100", "h:", "h:0", "h:70000", "a b:1"])
def test_address_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="instance"):
        Address.parse(text)


# --- protocol shapes -------------------------------------------------------


def test_prefill_body_asks_one_token_and_keeps_kv_for_a_decoder() -> None:
    body = chat_body(
        stream=True, stream_options={"include_usage": True}, max_completion_tokens=9
    )
    original = json.loads(json.dumps(body))

    leg = protocol.prefill_body(body)

    assert body == original, "the client's body is not modified"
    assert leg["stream"] is False
    assert (leg["max_tokens"], leg["min_tokens"], leg["max_completion_tokens"]) == (
        1,
        1,
        1,
    )
    assert "stream_options" not in leg
    assert leg["kv_transfer_params"] == PREFILL_REQUEST_PARAMS
    assert leg["messages"] == body["messages"]


def test_prefill_body_adds_no_max_completion_tokens_when_absent() -> None:
    assert "max_completion_tokens" not in protocol.prefill_body(completion_body())


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(chat_body(stream=True)).encode(),
        json.dumps(chat_body(), separators=(",", ":")).encode() + b"\n",
        json.dumps(chat_body(content="caf\u00e9"), ensure_ascii=False).encode(),
        json.dumps({**chat_body(), "kv_transfer_params": {"x": 1}}).encode(),
        json.dumps(chat_body()).encode("utf-16"),
    ],
)
def test_decode_payload_is_the_decode_body_without_reencoding(raw: bytes) -> None:
    body = protocol.parse_body(raw)
    params = {"remote_block_ids": [1, 2], "x_new": {"k": None}}

    payload = protocol.decode_payload(raw, body, params)

    assert json.loads(payload) == protocol.decode_body(body, params)
    assert protocol.decode_payload(raw, body, None) is raw


def test_stream_tail_sees_done_across_chunks() -> None:
    tail = protocol.StreamTail()
    tail.feed(b'data: {"x": 1}\n\ndata: [DO')
    assert not tail.finished
    tail.feed(b"NE]\n\n")
    assert tail.finished and tail.at_event_boundary


def test_request_id_is_kept_or_generated() -> None:
    assert protocol.request_id("abc-1") == "abc-1"
    generated = protocol.request_id(None)
    assert len(generated) == 32 and generated != protocol.request_id(None)
    with pytest.raises(BadRequestError):
        protocol.request_id("x" * 300)


@pytest.mark.parametrize(
    "body",
    [
        completion_body(stream_options={"include_usage": True}),
        {"prompt": "x", "stream_options": {"include_usage": True}},
    ],
)
def test_stream_options_without_stream_are_refused_as_vllm_does(
    body: dict[str, Any],
) -> None:
    with pytest.raises(BadRequestError, match="only be defined when `stream=True`"):
        protocol.check_stream_options(body)


@pytest.mark.parametrize(
    "body",
    [
        completion_body(stream=True, stream_options={"include_usage": True}),
        completion_body(stream_options={}),
        completion_body(stream_options=None),
        completion_body(),
    ],
)
def test_stream_options_with_stream_or_empty_are_fine(body: dict[str, Any]) -> None:
    protocol.check_stream_options(body)


# --- CLI and membership bodies ---------------------------------------------


def test_guide_flags_parse_into_one_prefiller_and_one_decoder() -> None:
    argv = "--host 192.0.0.1 --port 8080 --prefiller-hosts 192.0.0.1 "
    argv += "--prefiller-port 13700 --decoder-hosts 192.0.0.1 --decoder-ports 13701"
    settings = parse_settings(argv.split(), {})
    assert (settings.host, settings.port) == ("192.0.0.1", 8080)
    assert settings.prefill == (Address("192.0.0.1", 13700),)
    assert settings.decode == (Address("192.0.0.1", 13701),)
    assert settings.admin_token is None


def test_one_host_serves_many_ports_and_token_comes_from_env() -> None:
    argv = ["--decoder-hosts", "h", "--decoder-ports", "1", "2", "3"]
    settings = parse_settings(argv, {"PDSUPERVISORD_PROXY_TOKEN": "tok-zz9"})
    assert [str(a) for a in settings.decode] == ["h:1", "h:2", "h:3"]
    assert settings.prefill == ()
    assert settings.admin_token == "tok-zz9"
    assert "tok-zz9" not in repr(settings)


def test_example_proxy_flags_are_accepted() -> None:
    argv = "--workers 2 --log-level INFO --max-waiting-retries 3 --retry-delay 0.001"
    settings = parse_settings(argv.split(), {})
    assert settings.ignored_flags == ("--workers", "--max-waiting-retries")
    assert (settings.log_level, settings.retry_delay) == ("info", 0.001)


def test_health_probe_flags_and_defaults() -> None:
    assert parse_settings([], {}).probes == ProbeSettings(5.0, 2.0, 3, 2)
    argv = "--health-check-interval 0.5 --health-check-timeout 0.2 "
    argv += "--health-failure-threshold 4 --health-success-threshold 1"
    probes = parse_settings(argv.split(), {}).probes
    assert probes == ProbeSettings(0.5, 0.2, 4, 1)
    assert not parse_settings(["--health-check-interval", "0"], {}).probes.enabled


def test_event_loop_choice() -> None:
    assert parse_settings([], {}).event_loop == "asyncio"
    runner, name = event_loop_runner("asyncio")
    assert name == "asyncio" and runner is asyncio.run
    assert event_loop_runner("auto")[1] in {"asyncio", "uvloop"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--decoder-hosts", "a", "b", "c", "--decoder-ports", "1", "2"],
        ["--prefiller-hosts", "a"],
        ["--max-retries", "-1"],
        ["--retry-delay", "0"],
        ["--health-check-interval", "-1"],
        ["--health-failure-threshold", "0"],
        ["--event-loop", "trio"],
    ],
)
def test_bad_flags_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_settings(argv, {})
    assert raised.value.code == 2


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"type": "both", "instances": ["h:1"]},
        {"type": "decode", "instances": []},
        {"type": "decode", "instances": ["nope"]},
        {"type": "decode", "instances": ["h:1"], "wait": "yes"},
        {"type": "decode", "instances": ["h:1"], "timeout": -1},
    ],
)
def test_membership_body_errors_are_rejected(body: object) -> None:
    with pytest.raises(ValueError):
        parse_membership(body)


def test_membership_body_accepts_one_bare_instance_string() -> None:
    parsed = parse_membership({"type": "prefill", "instances": "h:8100"})
    assert parsed.role is Role.PREFILL
    assert parsed.addresses == (Address("h", 8100),)
    assert (parsed.wait, parsed.timeout) == (False, 60.0)


def test_package_exports() -> None:
    assert set(pdsupervisord.proxy.__all__) == {"ProxySettings", "build_app"}


# --- end to end: fixtures --------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy for most end-to-end tests; each test brings its backends."""
    args = "--port 0 --max-retries 2 --retry-delay 0.01 --connect-timeout 1 "
    args += "--prefill-timeout 1 --read-timeout 1 --eject-cooldown 0.3 "
    args += "--served-model-name tiny --health-check-interval 0"
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    process = ProxyProcess(args.split(), log, TOKEN).start()
    yield process
    process.stop()


@pytest.fixture
async def cluster(proxy: ProxyProcess) -> AsyncIterator[Cluster]:
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        cluster = Cluster(proxy, session)
        try:
            yield cluster
        finally:
            await cluster.clear()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Any]:
    """Start extra proxies with their own flags; all are stopped at the end."""
    started: list[ProxyProcess] = []

    def start(args: list[str], token: str | None = None) -> ProxyProcess:
        log = tmp_path / f"proxy-{len(started)}.log"
        process = ProxyProcess(args, log, token)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


# --- end to end: the protocol ----------------------------------------------

E2E_CASES = [
    pytest.param(CHAT, True, "client-id-1", id="chat-stream-client-id"),
    pytest.param(CHAT, False, None, id="chat-json-generated-id"),
    pytest.param(COMPLETIONS, True, None, id="completions-stream-generated-id"),
    pytest.param(COMPLETIONS, False, "client-id-2", id="completions-json-client-id"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("route", "stream", "client_id"), E2E_CASES)
async def test_request_goes_through_prefill_then_decode(
    cluster: Cluster, route: str, stream: bool, client_id: str | None
) -> None:
    prefiller = await cluster.backend("prefill")
    decoder = await cluster.backend("decode")
    make = chat_body if route == CHAT else completion_body
    options = {"stream_options": {"include_usage": True}} if stream else {}
    body = make(stream, max_completion_tokens=7, **options)
    headers = {} if client_id is None else {"X-Request-Id": client_id}

    status, raw, reply_headers = await cluster.post(route, body, headers)

    assert status == 200
    (p_seen,) = prefiller.seen
    (d_seen,) = decoder.seen
    request_id = reply_headers["X-Request-Id"]
    assert p_seen.request_id == d_seen.request_id == request_id
    if client_id is not None:
        assert request_id == client_id
    assert (p_seen.path, d_seen.path) == (route, route)
    assert p_seen.body == protocol.prefill_body(body)
    assert d_seen.body == {
        **body,
        "kv_transfer_params": prefiller.kv_params(request_id),
    }
    if stream:
        assert reply_headers["Content-Type"].startswith("text/event-stream")
        assert raw == b"".join(decoder.sent), "stream bytes are relayed unchanged"
        assert sse_data(raw)[-1] == "[DONE]"
    else:
        assert json.loads(raw)["id"] == f"cmpl-{request_id}"
    await cluster.assert_idle()


@pytest.mark.anyio
@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_upstream_4xx_is_passed_through_without_retry(
    cluster: Cluster, role: str
) -> None:
    prefiller = await cluster.backend("prefill")
    decoder = await cluster.backend("decode")
    rejecting = prefiller if role == "prefill" else decoder
    rejecting.mode = STATUS_400

    status, raw, _ = await cluster.post(CHAT, chat_body())

    assert status == 400
    assert json.loads(raw)["message"] == "prompt too long"
    assert len(rejecting.seen) == 1
    assert len(decoder.seen) == (0 if role == "prefill" else 1)
    await cluster.assert_idle()


@pytest.mark.anyio
async def test_prefill_5xx_is_retried_on_another_prefiller(cluster: Cluster) -> None:
    failing = await cluster.backend("prefill", mode=STATUS_500)
    await cluster.backend("prefill")
    decoder = await cluster.backend("decode")

    for _ in range(2):
        status, _, _ = await cluster.post(COMPLETIONS, completion_body())
        assert status == 200

    assert failing.seen, "round-robin ties send one of two requests to it first"
    assert len(decoder.seen) == 2
    views = {v["address"]: v for v in await cluster.instances()}
    assert views[failing.address]["errors"] == {"bad_status": len(failing.seen)}
    await cluster.assert_idle()


@pytest.mark.anyio
async def test_all_prefillers_refusing_gives_503_and_ejects_them(
    cluster: Cluster,
) -> None:
    dead = [dead_address(), dead_address()]
    await cluster.add("prefill", *dead)
    decoder = await cluster.backend("decode")

    status, raw, _ = await cluster.post(CHAT, chat_body())

    assert status == 503
    error = json.loads(raw)["error"]
    assert error["type"] == "upstream_unavailable"
    assert "cannot connect" in error["message"]
    assert not decoder.seen
    views = await cluster.instances()
    assert {v["state"] for v in views if v["type"] == "prefill"} == {"ejected"}
    await cluster.assert_idle()


@pytest.mark.anyio
async def test_refusing_prefiller_is_skipped_for_a_working_one(
    cluster: Cluster,
) -> None:
    await cluster.add("prefill", dead_address())
    await cluster.backend("prefill")
    await cluster.backend("decode")

    for _ in range(3):
        status, _, _ = await cluster.post(CHAT, chat_body())
        assert status == 200


@pytest.mark.anyio
@pytest.mark.parametrize("present", [None, "prefill", "decode"])
async def test_missing_role_gives_503_without_calling_the_other(
    cluster: Cluster, present: str | None
) -> None:
    mock = None if present is None else await cluster.backend(present)

    status, raw, _ = await cluster.post(CHAT, chat_body())

    assert status == 503
    missing = "prefill" if present == "decode" else "decode"
    message = json.loads(raw)["error"]["message"]
    assert (
        message == f"no {missing} backend available (0 active, 0 draining, 0 ejected)"
    )
    assert mock is None or not mock.seen, "no prefill runs without a decoder"


@pytest.mark.anyio
async def test_hanging_prefiller_gives_504(cluster: Cluster) -> None:
    await cluster.backend("prefill", mode=HANG)
    await cluster.backend("decode")

    status, raw, _ = await cluster.post(CHAT, chat_body())

    assert status == 504
    error = json.loads(raw)["error"]
    assert error["type"] == "upstream_timeout"
    assert "no answer in 1.0 s" in error["message"]
    await cluster.assert_idle()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", [DIE_MIDSTREAM, NO_DONE])
async def test_decoder_cut_midstream_ends_with_error_event_not_done(
    cluster: Cluster, mode: str
) -> None:
    await cluster.backend("prefill")
    await cluster.backend("decode", mode=mode)

    status, raw, _ = await cluster.post(CHAT, chat_body(stream=True))

    assert status == 200
    data = sse_data(raw)
    assert "[DONE]" not in data
    assert "t0 " in data[0]
    error = json.loads(data[-1])["error"]
    assert error["type"] == "upstream_error"
    assert "decode backend" in error["message"]
    await cluster.assert_idle()


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_decoder_failing_before_first_byte_retries_the_whole_request(
    cluster: Cluster, stream: bool
) -> None:
    prefiller = await cluster.backend("prefill")
    failing = await cluster.backend("decode", mode=DIE_BEFORE_FIRST)
    healthy = await cluster.backend("decode")

    for _ in range(2):
        status, _, _ = await cluster.post(CHAT, chat_body(stream=stream))
        assert status == 200

    assert failing.seen
    assert len(healthy.seen) == 2
    assert len(prefiller.seen) == 2 + len(failing.seen), "prefill is redone"
    retried = {s.request_id for s in failing.seen}
    assert retried <= {s.request_id for s in healthy.seen}
    await cluster.assert_idle()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", [DIE_BEFORE_FIRST, STATUS_500])
@pytest.mark.parametrize("stream", [False, True])
async def test_only_decoder_failing_gives_502_never_an_empty_200(
    cluster: Cluster, mode: str, stream: bool
) -> None:
    await cluster.backend("prefill")
    await cluster.backend("decode", mode=mode)

    status, raw, _ = await cluster.post(COMPLETIONS, completion_body(stream=stream))

    assert status == 502
    error = json.loads(raw)["error"]
    assert error["type"] == "upstream_error"
    assert "decode backend" in error["message"]
    await cluster.assert_idle()


@pytest.mark.anyio
async def test_missing_kv_transfer_params_gives_502_and_is_counted(
    cluster: Cluster,
) -> None:
    await cluster.backend("prefill", mode=NO_KV)
    decoder = await cluster.backend("decode")

    status, raw, _ = await cluster.post(CHAT, chat_body())

    assert status == 502
    error = json.loads(raw)["error"]
    assert error["type"] == "missing_kv_transfer_params"
    assert "--allow-decode-prefill-fallback" in error["message"]
    assert not decoder.seen
    async with cluster.session.get(cluster.url("/metrics")) as response:
        metrics = await response.text()
    assert "pdproxy_missing_kv_transfer_params_total 1.0" in metrics
    await cluster.assert_idle()


# --- end to end: membership, health, models, metrics ------------------------


@pytest.mark.anyio
async def test_membership_api_needs_the_token(cluster: Cluster) -> None:
    for token in (None, "wrong"):
        status, reply = await cluster.admin("GET", "/instances", token=token)
        assert status == 401, reply
        body = {"type": "decode", "instances": ["127.0.0.1:1"]}
        status, _ = await cluster.admin("POST", "/instances/add", body, token=token)
        assert status == 401
    assert await cluster.instances() == []


@pytest.mark.anyio
async def test_membership_add_list_remove(cluster: Cluster) -> None:
    address = dead_address()
    first = await cluster.add("decode", address)
    again = await cluster.add("decode", address)
    assert (
        first
        == again
        == {
            "type": "decode",
            "instances": [
                {
                    "type": "decode",
                    "address": address,
                    "state": "active",
                    "ejected_by": None,
                    "in_flight": 0,
                    "load": 0,
                    "requests": 0,
                    "errors": {},
                    "health": {"healthy": True, "failures": 0, "last_error": None},
                }
            ],
        }
    )
    assert [v["address"] for v in await cluster.instances()] == [address]

    body = {"type": "decode", "instances": [address, "127.0.0.1:1"]}
    status, reply = await cluster.admin("POST", "/instances/remove", body)
    assert status == 200
    assert reply == {
        "type": "decode",
        "removed": [address],
        "draining": [],
        "unknown": ["127.0.0.1:1"],
        "drained": True,
    }
    assert await cluster.instances() == []

    status, reply = await cluster.admin("POST", "/instances/add", {"type": "x"})
    assert status == 400 and "'type'" in reply["error"]["message"]


@pytest.mark.anyio
async def test_remove_with_wait_drains_an_in_flight_stream(cluster: Cluster) -> None:
    await cluster.backend("prefill")
    slow = await cluster.backend("decode", chunks=6, chunk_delay=0.1)
    in_flight = asyncio.create_task(cluster.post(CHAT, chat_body(stream=True)))
    await asyncio.wait_for(slow.arrived.wait(), timeout=5)

    other = await cluster.backend("decode")
    body = {"type": "decode", "instances": [slow.address], "wait": True, "timeout": 10}
    removal = asyncio.create_task(cluster.admin("POST", "/instances/remove", body))
    await wait_until(
        lambda: _state_is(cluster, slow.address, "draining"), what="draining"
    )
    status, _, _ = await cluster.post(CHAT, chat_body())
    assert status == 200 and len(other.seen) == 1, "draining gets no new request"

    status, reply = await removal
    assert status == 200
    assert reply["drained"] is True and reply["removed"] == [slow.address]
    status, raw, _ = await in_flight
    assert status == 200 and sse_data(raw)[-1] == "[DONE]"
    assert slow.address not in [v["address"] for v in await cluster.instances()]


async def _state_is(cluster: Cluster, address: str, state: str) -> bool:
    views = {v["address"]: v["state"] for v in await cluster.instances()}
    return views.get(address) == state


@pytest.mark.anyio
async def test_remove_with_wait_times_out_when_still_busy(cluster: Cluster) -> None:
    await cluster.backend("prefill")
    slow = await cluster.backend("decode", chunks=8, chunk_delay=0.1)
    in_flight = asyncio.create_task(cluster.post(CHAT, chat_body(stream=True)))
    await asyncio.wait_for(slow.arrived.wait(), timeout=5)

    body = {"type": "decode", "instances": [slow.address], "wait": True, "timeout": 0.2}
    status, reply = await cluster.admin("POST", "/instances/remove", body)

    assert status == 200 and reply["drained"] is False
    assert [v["address"] for v in reply["draining"]] == [slow.address]
    status, _, _ = await in_flight
    assert status == 200


@pytest.mark.anyio
async def test_health_needs_an_active_prefiller_and_decoder(cluster: Cluster) -> None:
    await cluster.backend("prefill")
    async with cluster.session.get(cluster.url("/health")) as response:
        assert response.status == 503
        assert "no active decode backend" in (await response.json())["reason"]

    await cluster.backend("decode")
    async with cluster.session.get(cluster.url("/health")) as response:
        assert response.status == 200
        assert await response.json() == {"prefill": 1, "decode": 1, "status": "ok"}


@pytest.mark.anyio
async def test_client_disconnect_cancels_upstream_and_releases_counters(
    cluster: Cluster,
) -> None:
    await cluster.backend("prefill")
    slow = await cluster.backend("decode", chunks=50, chunk_delay=0.1)

    async with cluster.session.post(
        cluster.url(CHAT), json=chat_body(stream=True)
    ) as response:
        assert response.status == 200
        await response.content.readany()
        response.close()

    async def upstream_cancelled() -> bool:
        return slow.cancelled == 1

    await wait_until(upstream_cancelled, what="the decoder's request to be cancelled")
    await cluster.assert_idle()


@pytest.mark.anyio
async def test_models_come_from_a_decoder_else_from_the_served_name(
    cluster: Cluster,
) -> None:
    async with cluster.session.get(cluster.url("/v1/models")) as response:
        assert response.status == 200
        assert (await response.json())["data"][0]["id"] == "tiny"

    await cluster.backend("decode")
    async with cluster.session.get(cluster.url("/v1/models")) as response:
        assert (await response.json())["data"][0]["id"] == "mock-model"


@pytest.mark.anyio
async def test_metrics_expose_requests_backends_and_latencies(
    cluster: Cluster,
) -> None:
    await cluster.backend("prefill")
    decoder = await cluster.backend("decode")
    status, _, _ = await cluster.post(CHAT, chat_body(stream=True))
    assert status == 200

    async with cluster.session.get(cluster.url("/metrics")) as response:
        text = await response.text()
    expected = [
        'pdproxy_requests_total{route="/v1/chat/completions",status="200"}',
        f'pdproxy_backend_in_flight{{backend="{decoder.address}",role="decode"}} 0.0',
        "pdproxy_prefill_seconds_count",
        "pdproxy_time_to_first_token_seconds_count",
        "pdproxy_e2e_request_latency_seconds_count",
        "pdproxy_retries_total",
    ]
    for line in expected:
        assert line in text


# --- end to end: standalone runs with other flags --------------------------


@pytest.mark.anyio
async def test_guide_command_line_works_standalone(start_proxy: Any) -> None:
    prefiller = await MockBackend("prefill").start()
    decoder = await MockBackend("decode").start()
    try:
        port = free_port()
        args = f"--host 127.0.0.1 --port {port} --prefiller-hosts 127.0.0.1 "
        args += f"--prefiller-port {prefiller.port} --decoder-hosts 127.0.0.1 "
        args += f"--decoder-ports {decoder.port}"
        proxy = start_proxy(args.split())
        assert proxy.port == port

        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + CHAT, json=chat_body()) as response:
                assert response.status == 200
            async with session.get(proxy.url + "/instances") as response:
                assert response.status == 403, "no token: membership API disabled"
            async with session.get(proxy.url + "/healthcheck") as response:
                assert response.status == 200
        assert len(decoder.seen) == 1
        (line,) = proxy.events("proxy.request")
        assert line["status"] == 200 and line["decode"] == decoder.address
    finally:
        await prefiller.stop()
        await decoder.stop()


@pytest.mark.anyio
async def test_fallback_option_sends_to_decoder_without_params(
    start_proxy: Any,
) -> None:
    prefiller = await MockBackend("prefill", mode=NO_KV).start()
    decoder = await MockBackend("decode").start()
    try:
        args = ["--port", "0", "--allow-decode-prefill-fallback"]
        args += ["--prefiller-ports", str(prefiller.port)]
        args += ["--decoder-ports", str(decoder.port)]
        proxy = start_proxy(args)

        async with (
            aiohttp.ClientSession() as session,
            session.post(proxy.url + CHAT, json=chat_body()) as response,
        ):
            assert response.status == 200
        (seen,) = decoder.seen
        assert seen.body == chat_body()
        (line,) = proxy.events("proxy.request")
        assert line["level"] == "warning" and line["decode_prefill_fallback"] is True
    finally:
        await prefiller.stop()
        await decoder.stop()


# --- end to end: active health probes --------------------------------------

PROBING = "--port 0 --retry-delay 0.01 --health-check-interval 0.05 "
PROBING += "--health-check-timeout 0.2 --health-failure-threshold 2 "
PROBING += "--health-success-threshold 2"


async def _views(session: aiohttp.ClientSession, proxy: ProxyProcess) -> Any:
    headers = {"X-API-Key": TOKEN}
    async with session.get(proxy.url + "/instances", headers=headers) as response:
        return {v["address"]: v for v in (await response.json())["instances"]}


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["status_503", "hang"])
async def test_failing_health_probe_ejects_a_decoder_until_it_recovers(
    start_proxy: Any, failure: str
) -> None:
    prefiller = await MockBackend("prefill").start()
    sick = await MockBackend("decode").start()
    well = await MockBackend("decode").start()
    try:
        args = [*PROBING.split(), "--prefiller-ports", str(prefiller.port)]
        args += ["--decoder-ports", str(sick.port), str(well.port)]
        proxy = start_proxy(args, token=TOKEN)
        if failure == "hang":
            sick.health_hang = True
        else:
            sick.health_status = 503

        async with aiohttp.ClientSession() as session:

            async def ejected() -> bool:
                view = (await _views(session, proxy))[sick.address]
                return bool(view["state"] == "ejected")

            await wait_until(ejected, what="the probe to eject the sick decoder")
            view = (await _views(session, proxy))[sick.address]
            assert view["ejected_by"] == "probe"
            assert view["health"]["healthy"] is False
            expected = "no answer in 0.2 s" if failure == "hang" else "answered 503"
            assert expected in view["health"]["last_error"]

            served_before = len(sick.seen)
            for _ in range(4):
                async with session.post(proxy.url + CHAT, json=chat_body()) as reply:
                    assert reply.status == 200
            assert len(sick.seen) == served_before, "no request to an ejected one"
            async with session.get(proxy.url + "/health") as reply:
                assert reply.status == 200, "one decoder is enough"
            async with session.get(proxy.url + "/metrics") as reply:
                metrics = await reply.text()
            labels = f'backend="{sick.address}",role="decode"'
            assert f"pdproxy_backend_healthy{{{labels}}} 0.0" in metrics
            ejections = f'backend="{sick.address}",reason="probe",role="decode"'
            assert f"pdproxy_backend_ejections_total{{{ejections}}} 1.0" in metrics
            assert f'{labels},state="ejected"}} 1.0' in metrics

            sick.health_hang, sick.health_status = False, 200

            async def active() -> bool:
                view = (await _views(session, proxy))[sick.address]
                return bool(view["state"] == "active")

            await wait_until(active, what="the probe to bring the decoder back")
            for _ in range(4):
                async with session.post(proxy.url + CHAT, json=chat_body()) as reply:
                    assert reply.status == 200
            assert len(sick.seen) > served_before, "back in rotation"
        events = [e["event"] for e in proxy.events()]
        assert "backend.unhealthy" in events and "backend.healthy" in events
    finally:
        for mock in (prefiller, sick, well):
            await mock.stop()


@pytest.mark.anyio
async def test_refusing_backend_is_probed_back_without_waiting_for_a_request(
    start_proxy: Any,
) -> None:
    """Passive ejection ends as soon as the probe reaches the backend again."""
    prefiller = await MockBackend("prefill").start()
    decoder = await MockBackend("decode").start()
    port = decoder.port
    await decoder.stop()
    try:
        args = [*PROBING.split(), "--eject-cooldown", "3600"]
        args += ["--prefiller-ports", str(prefiller.port), "--decoder-ports", str(port)]
        proxy = start_proxy(args, token=TOKEN)
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + CHAT, json=chat_body()) as reply:
                assert reply.status == 503
            address = f"127.0.0.1:{port}"
            assert (await _views(session, proxy))[address]["state"] == "ejected"

            await decoder.start_on(port)

            async def active() -> bool:
                return bool(
                    (await _views(session, proxy))[address]["state"] == "active"
                )

            await wait_until(active, what="the probe to restore the decoder")
            async with session.post(proxy.url + CHAT, json=chat_body()) as reply:
                assert reply.status == 200
    finally:
        await prefiller.stop()
        await decoder.stop()


# --- end to end: client disconnects ------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("leg", ["prefill", "decode"])
async def test_client_disconnect_cancels_the_leg_in_flight(
    cluster: Cluster, leg: str
) -> None:
    prefiller = await cluster.backend("prefill", mode=HANG if leg == "prefill" else OK)
    decoder = await cluster.backend("decode", mode=HANG if leg == "decode" else OK)
    hanging = prefiller if leg == "prefill" else decoder

    client = asyncio.create_task(cluster.post(CHAT, chat_body()))
    await asyncio.wait_for(hanging.arrived.wait(), timeout=5)
    client.cancel()  # closes the client's connection to the proxy
    with pytest.raises(asyncio.CancelledError):
        await client

    async def upstream_cancelled() -> bool:
        return hanging.cancelled == 1

    await wait_until(upstream_cancelled, timeout=2, what=f"the {leg} leg cancelled")
    await cluster.assert_idle()
    if leg == "prefill":
        assert not decoder.seen, "no decode leg for a client that left"
    # Nothing still holds the prefiller: it drains at once.
    body = {"type": "prefill", "instances": [prefiller.address], "wait": True}
    status, reply = await cluster.admin("POST", "/instances/remove", body)
    assert status == 200 and reply["drained"] is True


@pytest.mark.anyio
async def test_stream_options_without_stream_get_400_before_any_leg(
    cluster: Cluster,
) -> None:
    prefiller = await cluster.backend("prefill")
    body = chat_body(stream_options={"include_usage": True})

    status, raw, _ = await cluster.post(CHAT, body)

    assert status == 400
    assert "stream=True" in json.loads(raw)["error"]["message"]
    assert not prefiller.seen


@pytest.mark.anyio
async def test_metrics_have_per_backend_series(cluster: Cluster) -> None:
    prefiller = await cluster.backend("prefill")
    decoder = await cluster.backend("decode")
    for stream in (False, True):
        status, _, _ = await cluster.post(CHAT, chat_body(stream=stream))
        assert status == 200

    async with cluster.session.get(cluster.url("/metrics")) as response:
        text = await response.text()
    p_ids = f'backend="{prefiller.address}",role="prefill"'
    d_ids = f'backend="{decoder.address}",role="decode"'
    expected = [
        f"pdproxy_backend_requests_total{{{p_ids}}} 2.0",
        f"pdproxy_backend_load{{{p_ids}}} 0.0",
        f"pdproxy_backend_healthy{{{d_ids}}} 1.0",
        f"pdproxy_backend_prefill_seconds_count{{{p_ids}}} 2.0",
        f"pdproxy_backend_time_to_first_token_seconds_count{{{d_ids}}} 1.0",
        f"pdproxy_backend_e2e_request_latency_seconds_count{{{d_ids}}} 2.0",
        "pdproxy_backend_e2e_request_latency_seconds_bucket"
        f'{{backend="{decoder.address}",le="+Inf",role="decode"}} 2.0',
    ]
    for line in expected:
        assert line in text, line


# --- end to end: scale-down under load ---------------------------------------


@pytest.mark.anyio
async def test_scale_down_under_load_loses_no_request(cluster: Cluster) -> None:
    """Removing a P and a D with ``wait`` while requests flow fails none."""
    stay_p = await cluster.backend("prefill")
    stay_d = await cluster.backend("decode", chunks=4, chunk_delay=0.02)
    gone_p = await cluster.backend("prefill")
    gone_d = await cluster.backend("decode", chunks=4, chunk_delay=0.02)

    results: list[tuple[int, bytes]] = []

    async def client(count: int) -> None:
        for index in range(count):
            stream = index % 2 == 0
            status, raw, _ = await cluster.post(CHAT, chat_body(stream=stream))
            results.append((status, raw))

    load = [asyncio.create_task(client(8)) for _ in range(6)]
    await wait_until(
        _async(lambda: len(gone_d.seen) >= 2 and len(results) >= 3),
        what="load on every backend",
    )
    removals = [
        cluster.admin(
            "POST",
            "/instances/remove",
            {"type": role, "instances": [mock.address], "wait": True, "timeout": 10},
        )
        for role, mock in (("prefill", gone_p), ("decode", gone_d))
    ]
    replies = await asyncio.gather(*removals)
    # What the supervisor does next: stop the drained instances.
    await gone_p.stop()
    await gone_d.stop()
    await asyncio.gather(*load)

    assert all(status == 200 and reply["drained"] for status, reply in replies)
    assert len(results) == 48
    for status, raw in results:
        assert status == 200
        if raw.startswith(b"data:"):
            assert sse_data(raw)[-1] == "[DONE]"
    assert len(stay_p.seen) > 0 and len(stay_d.seen) > 0
    members = {v["address"] for v in await cluster.instances()}
    assert members == {stay_p.address, stay_d.address}


def _async(condition: Any) -> Any:
    async def check() -> bool:
        return bool(condition())

    return check


# --- end to end: stand-in engines with fault switches ------------------------
#
# Real vLLM-like processes (``python -m pdsupervisord.engine serve``) with a
# real P->D KV hand-off over TCP; each fault switch makes one engine fail the
# way a real one does. Engines with a one-shot fault serve one test each.

STANDIN_MODEL = "qwen25vl"


def _kv_config(role: str) -> str:
    return json.dumps(
        {
            "kv_connector": "LLMDataDistCMgrConnector",
            "kv_role": role,
            "kv_port": "20001",
            "engine_id": "0",
        }
    )


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """Stand-in engines by name; every process they started is killed at the end."""
    launcher = Launcher(tmp_path_factory.mktemp("standins"))
    plan = {
        "p0": ("kv_producer", ""),
        "p_spare": ("kv_producer", ""),
        "p_link_down": ("kv_producer", "kv_link_down"),
        "d0": ("kv_consumer", ""),
        "d_die_midstream": ("kv_consumer", "die_midstream=3"),
        "d_exit_after": ("kv_consumer", "exit_after=1"),
        "d_health_503": ("kv_consumer", "health_503"),
    }
    try:
        engines = {}
        for name, (role, fault) in plan.items():
            env = {
                "HCCL_IF_IP": "127.0.0.1",
                "VLLM_ASCEND_LLMDD_RPC_PORT": str(free_port()),
                # Long enough for requests to overlap a scale-down.
                "PDSD_ENGINE_TOKEN_SECONDS": "0.005",
            }
            if fault:
                env["PDSD_ENGINE_FAULT"] = fault
            engines[name] = launcher.start(
                "--served-model-name",
                STANDIN_MODEL,
                "--kv-transfer-config",
                _kv_config(role),
                env=env,
            )
        for name, engine in engines.items():
            if name == "d_health_503":
                engine_wait_until(lambda e=engine: port_accepts(e.port))
            else:
                engine.wait_healthy()
        yield engines
    finally:
        launcher.cleanup()


def _standin_proxy(
    start_proxy: Any, prefill: list[Engine], decode: list[Engine], *extra: str
) -> ProxyProcess:
    args = ["--port", "0", "--retry-delay", "0.01", "--eject-cooldown", "60"]
    args += ["--prefiller-ports", *(str(e.port) for e in prefill)]
    args += ["--decoder-ports", *(str(e.port) for e in decode), *extra]
    proxy: ProxyProcess = start_proxy(args, token=TOKEN)
    return proxy


def standin_body(stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": STANDIN_MODEL,
        "messages": [{"role": "user", "content": "What is the text in the image?"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
        **extra,
    }


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(url, json=body) as response:
        return response.status, await response.read()


@pytest.mark.anyio
async def test_standin_usage_is_reported_as_the_client_asked(
    standins: dict[str, Engine], start_proxy: Any
) -> None:
    p0, d0 = standins["p0"], standins["d0"]
    proxy = _standin_proxy(start_proxy, [p0], [d0])
    direct = d0.stream(CHAT, standin_body(True, stream_options={"include_usage": True}))
    (direct_usage,) = [c["usage"] for c in direct.chunks() if c.get("usage")]

    async with aiohttp.ClientSession() as session:
        with_usage = standin_body(True, stream_options={"include_usage": True})
        status, raw = await _post(session, proxy.url + CHAT, with_usage)
        assert status == 200
        chunks = [json.loads(d) for d in sse_data(raw)[:-1]]
        assert sse_data(raw)[-1] == "[DONE]"
        usages = [c["usage"] for c in chunks if c.get("usage")]
        assert usages == [direct_usage], "one usage chunk, the full prompt counted"
        assert chunks[-1]["choices"] == []

        status, raw = await _post(session, proxy.url + CHAT, standin_body(True))
        assert status == 200
        assert not [d for d in sse_data(raw)[:-1] if json.loads(d).get("usage")]

        status, raw = await _post(session, proxy.url + CHAT, standin_body(False))
        assert status == 200 and json.loads(raw)["usage"] == direct_usage


@pytest.mark.anyio
async def test_standin_decoder_dying_midstream_ends_the_stream_with_an_error(
    standins: dict[str, Engine], start_proxy: Any
) -> None:
    proxy = _standin_proxy(start_proxy, [standins["p0"]], [standins["d_die_midstream"]])
    async with aiohttp.ClientSession() as session:
        status, raw = await _post(session, proxy.url + CHAT, standin_body(True))

    assert status == 200, "the first tokens were already relayed"
    data = sse_data(raw)
    assert "[DONE]" not in data
    tokens = [json.loads(d) for d in data[:-1]]
    assert tokens and all("choices" in t for t in tokens)
    error = json.loads(data[-1])["error"]
    assert error["type"] == "upstream_error" and "stream cut" in error["message"]
    (line,) = proxy.events("proxy.request")
    assert line["error"] == "midstream" and line["level"] == "warning"


@pytest.mark.anyio
async def test_standin_decoder_that_exited_is_ejected_and_requests_retried(
    standins: dict[str, Engine], start_proxy: Any
) -> None:
    exiting = standins["d_exit_after"]
    proxy = _standin_proxy(start_proxy, [standins["p0"]], [exiting, standins["d0"]])
    async with aiohttp.ClientSession() as session:
        for index in range(6):
            body = standin_body(index % 2 == 0)
            status, raw = await _post(session, proxy.url + CHAT, body)
            assert status == 200, raw
            if body["stream"]:
                assert sse_data(raw)[-1] == "[DONE]"
        view = (await _views(session, proxy))[f"127.0.0.1:{exiting.port}"]

    assert exiting.process.poll() == 1
    assert (view["state"], view["ejected_by"]) == ("ejected", "connection")
    assert view["errors"].get("refused", 0) >= 1
    retried = [e for e in proxy.events("proxy.request") if e["upstream_calls"] > 2]
    assert retried, "the request that met the dead decoder was sent again"


@pytest.mark.anyio
async def test_standin_decoder_failing_health_is_ejected_by_the_probe(
    standins: dict[str, Engine], start_proxy: Any
) -> None:
    sick, d0 = standins["d_health_503"], standins["d0"]
    proxy = _standin_proxy(
        start_proxy, [standins["p0"]], [sick, d0], *PROBING.split()[2:]
    )
    address = f"127.0.0.1:{sick.port}"
    async with aiohttp.ClientSession() as session:

        async def ejected() -> bool:
            return bool((await _views(session, proxy))[address]["state"] == "ejected")

        await wait_until(ejected, what="the probe to eject the decoder")
        before = (await _views(session, proxy))[address]["requests"]
        for index in range(4):
            status, _ = await _post(
                session, proxy.url + CHAT, standin_body(index % 2 == 0)
            )
            assert status == 200
        view = (await _views(session, proxy))[address]
        async with session.get(proxy.url + "/health") as reply:
            health = await reply.json()

    assert view["requests"] == before
    assert view["ejected_by"] == "probe"
    assert "/health answered 503" in view["health"]["last_error"]
    assert health == {"prefill": 1, "decode": 1, "status": "ok"}


@pytest.mark.anyio
async def test_standin_broken_kv_link_is_retried_on_another_pair(
    standins: dict[str, Engine], start_proxy: Any
) -> None:
    broken, p0 = standins["p_link_down"], standins["p0"]
    proxy = _standin_proxy(start_proxy, [broken, p0], [standins["d0"]])
    async with aiohttp.ClientSession() as session:
        for index in range(4):
            status, raw = await _post(
                session, proxy.url + CHAT, standin_body(index % 2 == 0)
            )
            assert status == 200, raw
        views = await _views(session, proxy)

    assert views[f"127.0.0.1:{broken.port}"]["requests"] >= 1
    lines = proxy.events("proxy.request")
    retried = [e for e in lines if e["upstream_calls"] == 4]
    assert retried and all(e["prefill"] == f"127.0.0.1:{p0.port}" for e in retried)


@pytest.mark.anyio
async def test_standin_scale_down_under_load_loses_no_request(
    standins: dict[str, Engine], start_proxy: Any
) -> None:
    """Drain a prefiller while requests flow, then stop it, as the daemon does."""
    spare, p0, d0 = standins["p_spare"], standins["p0"], standins["d0"]
    proxy = _standin_proxy(start_proxy, [p0, spare], [d0])
    results: list[tuple[int, bytes]] = []

    async with aiohttp.ClientSession() as session:

        async def client(count: int) -> None:
            for index in range(count):
                body = standin_body(index % 2 == 0)
                results.append(await _post(session, proxy.url + CHAT, body))

        load = [asyncio.create_task(client(6)) for _ in range(4)]
        spare_address = f"127.0.0.1:{spare.port}"

        async def spare_busy() -> bool:
            view = (await _views(session, proxy))[spare_address]
            return bool(view["requests"] >= 2)

        await wait_until(spare_busy, what="load on the spare prefiller")
        body = {"type": "prefill", "instances": [spare_address], "wait": True}
        async with session.post(
            proxy.url + "/instances/remove", json=body, headers={"X-API-Key": TOKEN}
        ) as reply:
            assert (await reply.json())["drained"] is True
        spare.process.terminate()
        spare.wait_exit()
        await asyncio.gather(*load)

    assert len(results) == 24
    for status, raw in results:
        assert status == 200, raw
        if raw.startswith(b"data:"):
            assert sse_data(raw)[-1] == "[DONE]"


@pytest.mark.anyio
async def test_refused_decoder_is_ejected_then_tried_half_open_after_cooldown(
    cluster: Cluster,
) -> None:
    """The module's proxy has no probes and a 0.3 s cool-down."""
    await cluster.backend("prefill")
    decoder = await cluster.backend("decode")
    port = decoder.port
    await decoder.stop()

    status, raw, _ = await cluster.post(CHAT, chat_body())
    assert status == 503 and "cannot connect" in json.loads(raw)["error"]["message"]
    await decoder.start_on(port)
    status, raw, _ = await cluster.post(CHAT, chat_body())
    assert status == 503, "still ejected during the cool-down"
    assert "1 ejected" in json.loads(raw)["error"]["message"]
    assert not decoder.seen

    async def restored() -> bool:
        status, _, _ = await cluster.post(CHAT, chat_body())
        return status == 200

    await wait_until(restored, what="the half-open try to succeed")
    assert await _state_is(cluster, decoder.address, "active")
