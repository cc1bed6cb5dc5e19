"""Candidate: a bare ASGI app (no framework) with an aiohttp client.

Served by uvicorn (``uvicorn_aiohttp``: httptools parser, uvloop) or by
granian (``granian_aiohttp``: Rust HTTP server), to compare their servers
with aiohttp's own while the client stays the same.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from common import DECODE_URL, PREFILL_URL, decode_body, prefill_body

_session: aiohttp.ClientSession | None = None
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _client() -> aiohttp.ClientSession:
    global _session  # noqa: PLW0603 - one pool per worker, made on first use
    if _session is None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
        _session = aiohttp.ClientSession(connector=connector)
    return _session


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    body = json.loads(raw)
    session = _client()
    path = scope["path"]
    headers = {"Content-Type": "application/json"}
    async with session.post(
        PREFILL_URL + path, data=prefill_body(body), headers=headers
    ) as p:
        answer = await p.read()
    async with session.post(
        DECODE_URL + path, data=decode_body(body, answer), headers=headers
    ) as d:
        if body.get("stream") is True:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            async for chunk in d.content.iter_any():
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await d.read()
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": data})
