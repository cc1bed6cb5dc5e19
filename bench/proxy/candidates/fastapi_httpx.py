"""Candidate: FastAPI + httpx on uvicorn, the example proxy's stack."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
from common import DECODE_URL, PREFILL_URL, decode_body, prefill_body
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

app = FastAPI()
_client = httpx.AsyncClient(
    timeout=None,
    limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
)
_HEADERS = {"Content-Type": "application/json"}


@app.post("/v1/completions")
@app.post("/v1/chat/completions")
async def generate(request: Request) -> Response:
    body = json.loads(await request.body())
    path = request.url.path
    p = await _client.post(
        PREFILL_URL + path, content=prefill_body(body), headers=_HEADERS
    )
    payload = decode_body(body, p.content)
    if body.get("stream") is True:

        async def relay() -> AsyncIterator[bytes]:
            async with _client.stream(
                "POST", DECODE_URL + path, content=payload, headers=_HEADERS
            ) as d:
                async for chunk in d.aiter_bytes():
                    yield chunk

        return StreamingResponse(relay(), media_type="text/event-stream")
    d = await _client.post(DECODE_URL + path, content=payload, headers=_HEADERS)
    return Response(d.content, media_type="application/json")
