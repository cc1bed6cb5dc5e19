"""Forwarding one generation request: prefill leg, decode leg, relay.

Design notes:

- Retries share one budget per request (``max_retries``). A failed attempt
  excludes its backend from the rest of the request, except when the
  connection was merely dropped (often a stale keep-alive connection), so a
  request never waits twice on the same timeout.
- A decoder failure before anything reached the client retries the whole
  request, prefill included: the new decoder needs KV blocks of its own
  request id. The retry prefers another pair: the failed attempt's prefiller
  is avoided when another one is eligible. A decoder's 5xx is blamed on the
  pair, not on the decoder alone (a failed KV pull from a prefiller with a
  broken link answers 500 too), so that decoder is only avoided, not
  excluded: with one decoder the retry may still use it with another
  prefiller. After the first byte reached the client nothing can be retried;
  a stream is then ended with an error event and without ``data: [DONE]``.
- Every backend is held through a `Lease` used as a context manager, so its
  counters are released on success, on error and on cancellation. The server
  cancels a handler when its client disconnects; leaving the ``async with``
  of an upstream response then closes that connection, and vLLM aborts the
  request on its side.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import structlog
from aiohttp import hdrs, web

from pdsupervisord.proxy import protocol
from pdsupervisord.proxy.backends import Address, Backend, BackendState, Pool, Role
from pdsupervisord.proxy.errors import (
    AttemptError,
    BadRequestError,
    FailureKind,
    RequestFailedError,
    UpstreamRejectedError,
)
from pdsupervisord.proxy.metrics import ProxyMetrics
from pdsupervisord.proxy.protocol import REQUEST_ID_HEADER, JSONObject
from pdsupervisord.proxy.settings import ProxySettings

__all__ = ["CLIENT_CLOSED", "Exchange", "Forwarder"]

#: Headers that pin a request to one prefiller / one decoder (admin only).
PIN_PREFILL = "X-PD-Prefill"
PIN_DECODE = "X-PD-Decode"

_log = structlog.get_logger("pdsupervisord.proxy")

CLIENT_CLOSED = 499
"""Status recorded (never sent) when the client goes away mid-request."""

# Upstream error bodies are quoted in our messages up to this many bytes.
_SNIPPET_BYTES = 200
# Error kind counted when a backend answers 4xx (not a failure of the backend).
_REJECTED = "rejected"
# Exponential retry backoff stops growing here.
_MAX_RETRY_DELAY_S = 2.0
# /v1/models is cheap; a decoder slower than this is skipped.
_MODELS_TIMEOUT_S = 5.0


@dataclass
class Exchange:
    """What happened to one client request; it becomes its one log line."""

    request_id: str
    route: str
    started: float
    stream: bool = False
    prefill: str | None = None
    decode: str | None = None
    upstream_calls: int = 0
    status: int = 0
    error: str | None = None
    fallback: bool = False
    authorization: str | None = None
    prefill_address: Address | None = None
    decode_backend: Backend | None = None
    _headers: dict[str, str] | None = None

    def called(self, backend: Backend) -> None:
        """Record that a leg is being sent to this backend."""
        self.upstream_calls += 1
        if backend.role is Role.PREFILL:
            self.prefill = str(backend.address)
            self.prefill_address = backend.address
        else:
            self.decode = str(backend.address)
            self.decode_backend = backend

    def upstream_headers(self) -> dict[str, str]:
        """Headers both legs carry: the same request id, the client's auth."""
        headers = self._headers
        if headers is None:
            headers = {
                REQUEST_ID_HEADER: self.request_id,
                hdrs.CONTENT_TYPE: "application/json",
            }
            if self.authorization is not None:
                headers[hdrs.AUTHORIZATION] = self.authorization
            self._headers = headers
        return headers


class _Attempts:
    """Retry bookkeeping of one request: budget, tried backends, last failure."""

    def __init__(
        self,
        settings: ProxySettings,
        metrics: ProxyMetrics,
        pins: dict[Role, Address] | None = None,
    ) -> None:
        self.pins = pins or {}
        self._left = settings.max_retries
        self._delay = settings.retry_delay
        self._metrics = metrics
        self._tried: dict[Role, set[Address]] = {
            Role.PREFILL: set(),
            Role.DECODE: set(),
        }
        self._avoided: dict[Role, set[Address]] = {
            Role.PREFILL: set(),
            Role.DECODE: set(),
        }
        self._last: dict[Role, AttemptError] = {}

    def exclude(self, role: Role) -> frozenset[Address]:
        """Backends of this role not to pick again for this request."""
        return frozenset(self._tried[role])

    def avoid(self, role: Role) -> frozenset[Address]:
        """Backends of this role to pick again only when no other is left."""
        return frozenset(self._avoided[role])

    def only(self, role: Role) -> Address | None:
        """The backend this request is pinned to for ``role``, if any."""
        return self.pins.get(role)

    async def failed(
        self, failure: AttemptError, prefill: Address | None = None
    ) -> None:
        """Record a failure and wait before the retry.

        Args:
            failure: what failed.
            prefill: for a decode failure, the prefiller of the same attempt,
                avoided by the retry.

        Raises:
            RequestFailedError: the retry budget is spent.
        """
        self._last[failure.role] = failure
        if prefill is not None:
            self._avoided[Role.PREFILL].add(prefill)
        if failure.role is Role.DECODE and failure.kind is FailureKind.BAD_STATUS:
            self._avoided[Role.DECODE].add(failure.address)
        elif failure.kind is not FailureKind.DISCONNECTED:
            self._tried[failure.role].add(failure.address)
        if self._left == 0:
            raise RequestFailedError(
                failure.kind, f"{failure.message} (retries exhausted)"
            )

        self._left -= 1
        self._metrics.retries.labels(failure.role.value).inc()
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, _MAX_RETRY_DELAY_S)

    def nothing_left(self, pool: Pool) -> RequestFailedError:
        """The failure to answer when no backend of the pool can be tried."""
        last = self._last.get(pool.role)
        if last is not None:
            return RequestFailedError(
                last.kind, f"{last.message} (no other {pool.role.value} backend left)"
            )
        counts = ", ".join(f"{pool.count(s)} {s.value}" for s in BackendState)
        return RequestFailedError(
            FailureKind.NO_BACKEND,
            f"no {pool.role.value} backend available ({counts})",
        )


class _UpstreamErrors:
    """Turns aiohttp's errors on one backend into `AttemptError`.

    A backend that cannot be connected to is ejected for the cool-down. A
    class rather than a ``contextlib`` generator: it wraps every upstream
    call, and this costs a few microseconds less each time.
    """

    __slots__ = ("_backend", "_connect_timeout", "_timeout")

    def __init__(self, backend: Backend, settings: ProxySettings, timeout: float):
        self._backend = backend
        self._connect_timeout = settings.connect_timeout
        self._timeout = timeout

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ClientError)):
            raise self._translate(exc) from exc

    def _translate(self, exc: BaseException) -> AttemptError:
        backend = self._backend
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            backend.mark_unreachable(FailureKind.TIMEOUT.value)
            detail = f"cannot connect within {self._connect_timeout} s"
            return AttemptError(
                backend.role, backend.address, FailureKind.TIMEOUT, detail
            )
        if isinstance(exc, asyncio.TimeoutError):
            detail = f"no answer in {self._timeout} s"
            return _failed(backend, FailureKind.TIMEOUT, detail)
        if isinstance(exc, aiohttp.ClientConnectorError):
            backend.mark_unreachable(FailureKind.REFUSED.value)
            detail = f"cannot connect: {exc.strerror}"
            return AttemptError(
                backend.role, backend.address, FailureKind.REFUSED, detail
            )
        return _failed(backend, FailureKind.DISCONNECTED, f"connection lost: {exc!r}")


def _failed(backend: Backend, kind: FailureKind, detail: str) -> AttemptError:
    backend.count_error(kind.value)
    return AttemptError(backend.role, backend.address, kind, detail)


def _snippet(raw: bytes) -> str:
    text = raw[:_SNIPPET_BYTES].decode("utf-8", "replace").strip()
    return text or "<empty body>"


def _check_status(
    backend: Backend, status: int, raw: bytes, content_type: str | None
) -> None:
    """Raise for an upstream answer that is not a 200.

    Raises:
        UpstreamRejectedError: a 4xx, for the client to see as it is.
        AttemptError: any other status.
    """
    if 400 <= status < 500:
        backend.count_error(_REJECTED)
        raise UpstreamRejectedError(status, raw, content_type)
    if status != 200:
        detail = f"answered {status}: {_snippet(raw)}"
        raise _failed(backend, FailureKind.BAD_STATUS, detail)


def _content_type(upstream: aiohttp.ClientResponse) -> str | None:
    return upstream.headers.get(hdrs.CONTENT_TYPE)


def _encode(body: JSONObject) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


class Forwarder:
    """Serves generation requests over one pooled upstream client session.

    `start` must be awaited before the first request and `close` at the end.
    """

    def __init__(
        self,
        settings: ProxySettings,
        prefill: Pool,
        decode: Pool,
        metrics: ProxyMetrics,
    ) -> None:
        self._settings = settings
        self._prefill_pool = prefill
        self._decode_pool = decode
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._prefill_timeout = aiohttp.ClientTimeout(
            total=settings.prefill_timeout, sock_connect=settings.connect_timeout
        )
        self._decode_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout,
            sock_read=settings.read_timeout,
        )

    async def start(self) -> None:
        """Open the keep-alive connection pool to the backends."""
        # No connection limit: streams are long-lived and a limit would queue
        # requests here instead of in the engines' schedulers. Keep-alive
        # stays under uvicorn's 5 s server-side timeout so a connection is
        # not reused just as the server closes it.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        # No cookie jar: cookies one client's answer set must not travel
        # with another client's requests.
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The upstream client session.

        Raises:
            RuntimeError: `start` has not been awaited.
        """
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        return self._session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one ``/v1/completions`` or ``/v1/chat/completions`` request.

        Never raises for upstream trouble: every failure becomes an answer.
        Logs exactly one ``proxy.request`` line.
        """
        ex = Exchange(
            request_id="",  # set from the header, or generated, in _answer
            route=request.path,
            started=time.monotonic(),
            authorization=request.headers.get(hdrs.AUTHORIZATION),
        )
        try:
            return await self._answer(request, ex)
        except asyncio.CancelledError:
            ex.status, ex.error = CLIENT_CLOSED, "client_disconnected"
            raise
        except Exception as exc:
            # Not swallowed: re-raised for aiohttp to answer 500. Recorded so
            # the request's one log line says what happened.
            ex.status, ex.error = 500, f"internal: {exc!r}"
            raise
        finally:
            self._finish(ex)

    async def fetch_models(self, authorization: str | None) -> bytes | None:
        """``GET /v1/models`` from the first active decoder that answers."""
        headers = {} if authorization is None else {hdrs.AUTHORIZATION: authorization}
        timeout = aiohttp.ClientTimeout(total=_MODELS_TIMEOUT_S)
        for backend in self._decode_pool:
            if backend.state is not BackendState.ACTIVE:
                continue
            url = backend.address.url + "/v1/models"
            try:
                async with self.session.get(url, headers=headers, timeout=timeout) as r:
                    if r.status == 200:
                        return await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                # Another decoder, or the configured model name, answers.
                continue
        return None

    async def _answer(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        try:
            ex.request_id = protocol.request_id(request.headers.get(REQUEST_ID_HEADER))
            raw = await _read_body(request)
            body = protocol.parse_body(raw)
            ex.stream = protocol.is_streamed(body)
            protocol.check_stream_options(body)
            return await self._forward(request, raw, body, ex)
        except BadRequestError as exc:
            return self._error(ex, exc.status, "invalid_request_error", exc.message)
        except UpstreamRejectedError as exc:
            ex.status, ex.error = exc.status, "upstream_rejected"
            response = web.Response(status=exc.status, body=exc.body)
            self._set_headers(response, ex, exc.content_type)
            return response
        except RequestFailedError as exc:
            ex.error = exc.kind.value
            return self._error(ex, exc.status, exc.error_type, exc.message)

    def _pins(self, request: web.Request) -> dict[Role, Address]:
        """Backends named by the ``X-PD-Prefill``/``X-PD-Decode`` headers.

        Only callers holding the admin token may pin (the supervisor's canary
        tests each pair this way); anyone else gets 403.

        Raises:
            BadRequestError: for a pin without the token or a bad address.
        """
        pins: dict[Role, Address] = {}
        for role, header in ((Role.PREFILL, PIN_PREFILL), (Role.DECODE, PIN_DECODE)):
            if header in request.headers:
                try:
                    pins[role] = Address.parse(request.headers[header])
                except ValueError as exc:
                    raise BadRequestError(400, str(exc)) from None
        if pins and not self._may_pin(request):
            raise BadRequestError(403, "pinning a backend needs the admin X-API-Key")
        return pins

    def _may_pin(self, request: web.Request) -> bool:
        token = self._settings.admin_token
        presented = request.headers.get("X-API-Key", "")
        return token is not None and hmac.compare_digest(
            presented.encode(), token.encode()
        )

    async def _forward(
        self, request: web.Request, raw: bytes, body: JSONObject, ex: Exchange
    ) -> web.StreamResponse:
        attempts = _Attempts(self._settings, self._metrics, self._pins(request))
        while True:
            # A prefill with no decoder to take it would pin KV blocks on the
            # prefiller until its abort timeout, for nothing.
            decoders = attempts.exclude(Role.DECODE)
            if not self._decode_pool.has_eligible(decoders, attempts.only(Role.DECODE)):
                raise attempts.nothing_left(self._decode_pool)
            kv_params, kv_done = await self._prefill(body, ex, attempts)
            prefiller = ex.prefill_address
            payload = protocol.decode_payload(raw, body, kv_params)
            try:
                return await self._decode(request, payload, ex, attempts)
            except AttemptError as failure:
                await attempts.failed(failure, prefiller)
            finally:
                kv_done()

    async def _prefill(
        self, body: JSONObject, ex: Exchange, attempts: _Attempts
    ) -> tuple[JSONObject | None, Callable[[], None]]:
        """Run the P leg; returns its kv_transfer_params and a function to
        call once the decoder is done with them (until then the prefiller
        cannot finish draining)."""
        payload = _encode(protocol.prefill_body(body))
        while True:
            pool = self._prefill_pool
            lease = pool.acquire(
                len(payload),
                attempts.exclude(Role.PREFILL),
                attempts.only(Role.PREFILL),
                attempts.avoid(Role.PREFILL),
            )
            if lease is None:
                raise attempts.nothing_left(pool)

            ex.called(lease.backend)
            try:
                with lease:
                    answer = await self._prefill_once(lease.backend, payload, ex)
                    kv_done = lease.hand_off()
            except AttemptError as failure:
                await attempts.failed(failure)
                continue
            try:
                return self._kv_params(lease.backend, answer, ex), kv_done
            except BaseException:
                kv_done()
                raise

    async def _prefill_once(
        self, backend: Backend, payload: bytes, ex: Exchange
    ) -> JSONObject:
        started = time.monotonic()
        with _UpstreamErrors(backend, self._settings, self._settings.prefill_timeout):
            async with self.session.post(
                backend.address.url + ex.route,
                data=payload,
                headers=ex.upstream_headers(),
                timeout=self._prefill_timeout,
            ) as upstream:
                backend.mark_reachable()
                raw = await upstream.read()
        _check_status(backend, upstream.status, raw, _content_type(upstream))

        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            detail = f"answered 200 without a JSON object: {_snippet(raw)}"
            raise _failed(backend, FailureKind.BAD_ANSWER, detail)
        elapsed = time.monotonic() - started
        self._metrics.prefill_seconds.observe(elapsed)
        backend.prefill_seconds.observe(elapsed)
        return answer

    def _kv_params(
        self, backend: Backend, answer: JSONObject, ex: Exchange
    ) -> JSONObject | None:
        params = protocol.kv_params_of(answer)
        if params is not None:
            return params

        backend.count_error(FailureKind.MISSING_KV_PARAMS.value)
        self._metrics.missing_kv_params.inc()
        if not self._settings.allow_decode_prefill_fallback:
            raise RequestFailedError(
                FailureKind.MISSING_KV_PARAMS,
                f"prefill backend {backend.address} answered without "
                "kv_transfer_params: is it started with a kv_producer "
                "--kv-transfer-config? (--allow-decode-prefill-fallback lets "
                "the decoder prefill instead)",
            )
        ex.fallback = True
        return None

    async def _decode(
        self, request: web.Request, payload: bytes, ex: Exchange, attempts: _Attempts
    ) -> web.StreamResponse:
        lease = self._decode_pool.acquire(
            exclude=attempts.exclude(Role.DECODE),
            only=attempts.only(Role.DECODE),
            avoid=attempts.avoid(Role.DECODE),
        )
        if lease is None:
            raise attempts.nothing_left(self._decode_pool)

        backend = lease.backend
        ex.called(backend)
        with (
            lease,
            _UpstreamErrors(backend, self._settings, self._settings.read_timeout),
        ):
            async with self.session.post(
                backend.address.url + ex.route,
                data=payload,
                headers=ex.upstream_headers(),
                timeout=self._decode_timeout,
            ) as upstream:
                backend.mark_reachable()
                if upstream.status != 200:
                    raw = await upstream.read()
                    _check_status(
                        backend, upstream.status, raw, _content_type(upstream)
                    )
                if ex.stream:
                    return await self._relay_stream(request, upstream, ex, backend)
                return await self._relay_whole(upstream, ex, backend)

    async def _relay_whole(
        self, upstream: aiohttp.ClientResponse, ex: Exchange, backend: Backend
    ) -> web.Response:
        try:
            raw = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Not retried: the decoder may have generated the whole answer.
            kind = (
                FailureKind.TIMEOUT
                if isinstance(exc, asyncio.TimeoutError)
                else FailureKind.DISCONNECTED
            )
            failure = _failed(backend, kind, f"answer cut short: {exc!r}")
            raise RequestFailedError(kind, failure.message) from exc
        if not raw:
            failure = _failed(backend, FailureKind.BAD_ANSWER, "answered 200, no body")
            raise RequestFailedError(FailureKind.BAD_ANSWER, failure.message)

        ex.status = upstream.status
        response = web.Response(status=upstream.status, body=raw)
        self._set_headers(response, ex, _content_type(upstream))
        return response

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        ex: Exchange,
        backend: Backend,
    ) -> web.StreamResponse:
        # Read the first bytes before answering: until then a failure can
        # still be retried on another pair, invisibly to the client.
        first = await upstream.content.readany()
        if not first:
            detail = "closed the stream before the first byte"
            raise _failed(backend, FailureKind.DISCONNECTED, detail)

        response = web.StreamResponse(status=upstream.status)
        content_type = upstream.headers.get(hdrs.CONTENT_TYPE, "text/event-stream")
        self._set_headers(response, ex, content_type)
        response.headers[hdrs.CACHE_CONTROL] = "no-cache"
        ex.status = upstream.status
        try:
            await response.prepare(request)
            await response.write(first)
            ttft = time.monotonic() - ex.started
            self._metrics.ttft_seconds.observe(ttft)
            backend.first_token_seconds.observe(ttft)
            await self._pump(upstream, response, first, ex, backend)
            await response.write_eof()
        except ConnectionResetError:
            ex.status, ex.error = CLIENT_CLOSED, "client_disconnected"
        return response

    async def _pump(
        self,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        first: bytes,
        ex: Exchange,
        backend: Backend,
    ) -> None:
        """Relay upstream bytes as they come; end a cut stream with an error."""
        tail = protocol.StreamTail()
        tail.feed(first)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                await self._end_with_error(response, tail, ex, backend, repr(exc))
                return
            if not chunk:
                break
            await response.write(chunk)
            tail.feed(chunk)

        if not tail.finished:
            detail = "stream ended without data: [DONE]"
            await self._end_with_error(response, tail, ex, backend, detail)

    async def _end_with_error(
        self,
        response: web.StreamResponse,
        tail: protocol.StreamTail,
        ex: Exchange,
        backend: Backend,
        detail: str,
    ) -> None:
        failure = _failed(backend, FailureKind.MIDSTREAM, f"stream cut: {detail}")
        ex.error = FailureKind.MIDSTREAM.value
        separator = b"" if tail.at_event_boundary else b"\n\n"
        event = protocol.sse_error_event(502, "upstream_error", failure.message)
        await response.write(separator + event)

    def _error(
        self, ex: Exchange, status: int, error_type: str, message: str
    ) -> web.Response:
        ex.status = status
        if not ex.request_id:  # the header was refused
            ex.request_id = protocol.request_id(None)
        response = web.json_response(
            protocol.error_body(status, error_type, message), status=status
        )
        response.headers[REQUEST_ID_HEADER] = ex.request_id
        return response

    @staticmethod
    def _set_headers(
        response: web.StreamResponse, ex: Exchange, content_type: str | None
    ) -> None:
        response.headers[hdrs.CONTENT_TYPE] = content_type or "application/json"
        response.headers[REQUEST_ID_HEADER] = ex.request_id

    def _finish(self, ex: Exchange) -> None:
        elapsed = time.monotonic() - ex.started
        self._metrics.count_request(ex.route, ex.status)
        if ex.status == 200 and ex.error is None:
            self._metrics.e2e_seconds.observe(elapsed)
            if ex.decode_backend is not None:
                ex.decode_backend.e2e_seconds.observe(elapsed)

        midstream = ex.error == FailureKind.MIDSTREAM.value
        troubled = ex.status >= 500 or midstream or ex.fallback
        log = _log.warning if troubled else _log.info
        log(
            "proxy.request",
            request_id=ex.request_id,
            route=ex.route,
            stream=ex.stream,
            prefill=ex.prefill,
            decode=ex.decode,
            status=ex.status,
            duration_ms=round(elapsed * 1000, 1),
            upstream_calls=ex.upstream_calls,
            error=ex.error,
            decode_prefill_fallback=ex.fallback,
        )


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BadRequestError(413, f"request body too large: {exc.text}") from exc
