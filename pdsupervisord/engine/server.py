"""The stand-in's HTTP application: routes, API key check, health, models, metrics.

=============================  ==============================================
``GET /health``                200, empty body; 503 once the engine child died
``GET /metrics``               Prometheus text, vLLM metric names
``GET /v1/models``             the served model names, OpenAI list format
``POST /v1/completions``       see :mod:`pdsupervisord.engine.serving`
``POST /v1/chat/completions``  see :mod:`pdsupervisord.engine.serving`
=============================  ==============================================

With ``--api-key`` every ``/v1/*`` route needs ``Authorization: Bearer KEY``
and answers 401 without it; ``/health`` and ``/metrics`` never need it. With
``--enable-request-id-headers`` every answer carries ``X-Request-Id`` (the
request's, else a new uuid4 hex); without it none does, as in vLLM.
"""

from __future__ import annotations

import hmac
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from pdsupervisord.engine.metrics import CONTENT_TYPE
from pdsupervisord.engine.serving import handle_chat, handle_completions
from pdsupervisord.engine.state import STATE, ApiState

__all__ = ["build_app"]

#: Largest request body accepted: base64 images make chat bodies large.
MAX_BODY_BYTES = 64 * 1024 * 1024


def build_app(state: ApiState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application(
        middlewares=[_require_api_key], client_max_size=MAX_BODY_BYTES
    )
    app[STATE] = state
    if state.settings.args.enable_request_id_headers:
        app.on_response_prepare.append(_add_request_id)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/chat/completions", handle_chat)
    return app


@web.middleware
async def _require_api_key(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    key = request.app[STATE].settings.args.api_key
    if key and request.path.startswith("/v1"):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return web.json_response({"error": "Unauthorized"}, status=401)
    return await handler(request)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    response.headers["X-Request-Id"] = request_id


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[STATE].healthy else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _models(request: web.Request) -> web.Response:
    args = request.app[STATE].settings.args
    created = int(time.time())
    models = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": args.model,
            "parent": None,
            "max_model_len": args.max_model_len,
        }
        for name in args.served_model_names
    ]
    return web.json_response({"object": "list", "data": models})
