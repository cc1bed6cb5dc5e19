"""The proxy's aiohttp application: routes, shared state, start and stop.

Routes:

- ``POST /v1/completions``, ``POST /v1/chat/completions``: the PD protocol
  (`pdsupervisord.proxy.forward`).
- ``GET /v1/models``: from an active decoder, else built from
  ``--served-model-name``, else 503.
- ``GET /health`` (alias ``/healthcheck``, the example proxy's name): 200
  with at least one active prefiller and one active decoder, else 503 with
  the reason.
- ``GET /metrics``: Prometheus text format.
- ``/instances...``: the membership API (`pdsupervisord.proxy.admin`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiohttp import hdrs, web

from pdsupervisord.proxy import protocol
from pdsupervisord.proxy.admin import admin_routes
from pdsupervisord.proxy.backends import (
    BackendState,
    Pool,
    Role,
    outstanding_requests,
    outstanding_work,
)
from pdsupervisord.proxy.forward import Forwarder
from pdsupervisord.proxy.health import HealthProber
from pdsupervisord.proxy.metrics import CONTENT_TYPE, ProxyMetrics
from pdsupervisord.proxy.settings import ProxySettings
from pdsupervisord.proxy.state import STATE, ProxyState

__all__ = ["build_app"]


def build_app(settings: ProxySettings) -> web.Application:
    """Build the proxy application with its backends from the settings.

    The upstream connection pool and the health probes start with the app
    and stop when it is cleaned up.
    """
    prefill = Pool(Role.PREFILL, outstanding_work, settings.eject_cooldown)
    decode = Pool(Role.DECODE, outstanding_requests, settings.eject_cooldown)
    for address in settings.prefill:
        prefill.add(address)
    for address in settings.decode:
        decode.add(address)

    metrics = ProxyMetrics([prefill, decode])
    forwarder = Forwarder(settings, prefill, decode, metrics)
    prober = HealthProber(settings.probes, [prefill, decode])
    app = web.Application(client_max_size=settings.max_request_bytes)
    app[STATE] = ProxyState(settings, prefill, decode, metrics, forwarder, prober)
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_health_probes)
    app.add_routes(
        [
            web.post("/v1/completions", _generate),
            web.post("/v1/chat/completions", _generate),
            web.get("/v1/models", _models),
            web.get("/health", _health),
            web.get("/healthcheck", _health),
            web.get("/metrics", _metrics),
            *admin_routes(),
        ]
    )
    return app


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    forwarder = app[STATE].forwarder
    await forwarder.start()
    yield
    await forwarder.close()


async def _health_probes(app: web.Application) -> AsyncIterator[None]:
    prober = app[STATE].prober
    await prober.start()
    yield
    await prober.close()


async def _generate(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].forwarder.handle(request)


async def _models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await state.forwarder.fetch_models(request.headers.get(hdrs.AUTHORIZATION))
    if body is not None:
        return web.Response(body=body, content_type="application/json")

    name = state.settings.served_model_name
    if name is None:
        message = "no active decoder answered and --served-model-name is not set"
        error = protocol.error_body(503, "upstream_unavailable", message)
        return web.json_response(error, status=503)
    model = {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "pdsupervisord",
    }
    return web.json_response({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    reply: dict[str, object] = {
        role.value: state.pool(role).count(BackendState.ACTIVE) for role in Role
    }
    missing = [_why_unavailable(state.pool(role)) for role in Role]
    reasons = [reason for reason in missing if reason is not None]
    if reasons:
        reply.update(status="unavailable", reason="; ".join(reasons))
        return web.json_response(reply, status=503)
    reply["status"] = "ok"
    return web.json_response(reply)


def _why_unavailable(pool: Pool) -> str | None:
    """Why the pool cannot serve, or None when it has an active backend."""
    if pool.count(BackendState.ACTIVE) > 0:
        return None
    counts = ", ".join(
        f"{pool.count(state)} {state.value}"
        for state in (BackendState.DRAINING, BackendState.EJECTED)
    )
    return f"no active {pool.role.value} backend ({counts})"


async def _metrics(request: web.Request) -> web.StreamResponse:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})
