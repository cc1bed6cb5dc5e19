"""The membership API the supervisor uses to change the proxy's backends.

Wire format (all JSON; every route needs header ``X-API-Key: <token>``):

``GET /instances``
    ``{"instances": [{"type", "address", "state", "in_flight", "load",
    "errors"}, ...]}``

``POST /instances/add`` ``{"type": "prefill"|"decode", "instances":
["host:port", ...]}`` (one bare ``"host:port"`` string is accepted too)
    Idempotent; re-adding a draining backend reactivates it.
    Reply: ``{"type", "instances": [<backend>, ...]}``.

``POST /instances/remove`` ``{"type", "instances", "wait": false,
"timeout": 60}``
    Drains: the backends get no new requests and leave once idle. With
    ``wait`` the reply comes when they are idle or after ``timeout`` seconds.
    Reply: ``{"type", "removed": ["host:port", ...], "draining":
    [<backend>, ...], "unknown": ["host:port", ...], "drained": bool}``.

Errors: 400 bad body, 401 missing or wrong key, 403 no token configured
(``PDSUPERVISORD_PROXY_TOKEN`` unset and no ``--admin-token-optional``).
Every error body is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from pdsupervisord.proxy import protocol
from pdsupervisord.proxy.backends import Address, BackendState, Pool, Role
from pdsupervisord.proxy.settings import ProxySettings
from pdsupervisord.proxy.state import STATE

__all__ = [
    "ADMIN_TOKEN_ENV",
    "API_KEY_HEADER",
    "MembershipRequest",
    "admin_routes",
    "parse_membership",
]

_log = structlog.get_logger("pdsupervisord.proxy.admin")

ADMIN_TOKEN_ENV = "PDSUPERVISORD_PROXY_TOKEN"
API_KEY_HEADER = "X-API-Key"

_DEFAULT_WAIT_S = 60.0
_MAX_WAIT_S = 3600.0
# How often a waiting remove looks at the in-flight counts; 50 ms is short
# next to any generation request and costs nothing.
_DRAIN_POLL_S = 0.05

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class MembershipRequest:
    """A parsed ``/instances/add`` or ``/instances/remove`` body."""

    role: Role
    addresses: tuple[Address, ...]
    wait: bool = False
    timeout: float = _DEFAULT_WAIT_S


def parse_membership(body: object) -> MembershipRequest:
    """Validate a membership request body.

    Raises:
        ValueError: a field is missing or malformed; the message names it.
    """
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    try:
        role = Role(body.get("type"))
    except ValueError:
        raise ValueError("'type' must be 'prefill' or 'decode'") from None
    instances = body.get("instances")
    if isinstance(instances, str):
        instances = [instances]  # the example proxy accepts one bare string
    if not isinstance(instances, list) or not instances:
        raise ValueError("'instances' must be a non-empty list of 'host:port'")
    if not all(isinstance(item, str) for item in instances):
        raise ValueError("'instances' must hold strings 'host:port'")

    wait = body.get("wait", False)
    timeout = body.get("timeout", _DEFAULT_WAIT_S)
    if not isinstance(wait, bool):
        raise ValueError("'wait' must be true or false")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError("'timeout' must be a number of seconds")
    if not 0 < timeout <= _MAX_WAIT_S:
        raise ValueError(f"'timeout' must be in (0, {_MAX_WAIT_S:g}] seconds")
    addresses = tuple(Address.parse(item) for item in instances)
    return MembershipRequest(role, addresses, wait, float(timeout))


def admin_routes() -> list[web.RouteDef]:
    """The membership API's routes, each guarded by the token check."""
    return [
        web.get("/instances", _guarded(_list_instances)),
        web.post("/instances/add", _guarded(_add_instances)),
        web.post("/instances/remove", _guarded(_remove_instances)),
    ]


def _guarded(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = _refusal(request.app[STATE].settings, request)
        if refusal is not None:
            return refusal
        return await handler(request)

    return guarded


def _refusal(settings: ProxySettings, request: web.Request) -> web.Response | None:
    """The error answer for a caller without the right key, else None."""
    token = settings.admin_token
    if token is None:
        if settings.admin_token_optional:
            return None
        message = (
            f"membership API disabled: set {ADMIN_TOKEN_ENV} for the proxy "
            "(or start it with --admin-token-optional)"
        )
        return _error(403, "permission_error", message)

    presented = request.headers.get(API_KEY_HEADER, "")
    if not hmac.compare_digest(presented.encode(), token.encode()):
        return _error(401, "authentication_error", f"missing or wrong {API_KEY_HEADER}")
    return None


async def _list_instances(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    views = [b.view().as_json() for pool in (state.prefill, state.decode) for b in pool]
    return web.json_response({"instances": views})


async def _add_instances(request: web.Request) -> web.StreamResponse:
    parsed = await _membership(request)
    if isinstance(parsed, web.Response):
        return parsed

    pool = request.app[STATE].pool(parsed.role)
    views = [pool.add(address).view().as_json() for address in parsed.addresses]
    _log.info(
        "proxy.instances_added",
        role=parsed.role.value,
        instances=[str(a) for a in parsed.addresses],
    )
    return web.json_response({"type": parsed.role.value, "instances": views})


async def _remove_instances(request: web.Request) -> web.StreamResponse:
    parsed = await _membership(request)
    if isinstance(parsed, web.Response):
        return parsed

    pool = request.app[STATE].pool(parsed.role)
    members = {address: pool.remove(address) for address in parsed.addresses}
    known = [address for address, backend in members.items() if backend is not None]
    unknown = [str(address) for address, backend in members.items() if backend is None]
    if parsed.wait:
        await _wait_drained(pool, known, parsed.timeout)

    draining = [a for a in known if _is_draining(pool, a)]
    reply = {
        "type": parsed.role.value,
        "removed": [str(a) for a in known if pool.get(a) is None],
        "draining": [_view_json(pool, a) for a in draining],
        "unknown": unknown,
        "drained": not draining,
    }
    _log.info(
        "proxy.instances_removed",
        role=parsed.role.value,
        instances=[str(a) for a in parsed.addresses],
        waited=parsed.wait,
        drained=not draining,
    )
    return web.json_response(reply)


async def _membership(request: web.Request) -> MembershipRequest | web.Response:
    """The parsed body, or a 400 answer saying what is wrong with it."""
    try:
        return parse_membership(json.loads(await request.read()))
    except ValueError as exc:
        return _error(400, "invalid_request_error", str(exc))


async def _wait_drained(pool: Pool, addresses: list[Address], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(_is_draining(pool, a) for a in addresses) and loop.time() < deadline:
        await asyncio.sleep(_DRAIN_POLL_S)


def _is_draining(pool: Pool, address: Address) -> bool:
    backend = pool.get(address)
    return backend is not None and backend.state is BackendState.DRAINING


def _view_json(pool: Pool, address: Address) -> dict[str, object]:
    backend = pool.get(address)
    return {} if backend is None else backend.view().as_json()


def _error(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response(
        protocol.error_body(status, error_type, message), status=status
    )
