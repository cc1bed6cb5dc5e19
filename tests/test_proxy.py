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
from proxy_helpers import (
    DIE_BEFORE_FIRST,
    DIE_MIDSTREAM,
    HANG,
    NO_DONE,
    NO_KV,
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
    BackendState,
    Pool,
    Role,
    outstanding_requests,
    outstanding_work,
)
from pdsupervisord.proxy.cli import parse_settings
from pdsupervisord.proxy.errors import BadRequestError

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


@pytest.mark.parametrize(
    "argv",
    [
        ["--decoder-hosts", "a", "b", "c", "--decoder-ports", "1", "2"],
        ["--prefiller-hosts", "a"],
        ["--max-retries", "-1"],
        ["--retry-delay", "0"],
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
    args += "--served-model-name tiny"
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
    body = make(stream, stream_options={"include_usage": True}, max_completion_tokens=7)
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
                    "in_flight": 0,
                    "load": 0,
                    "errors": {},
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
