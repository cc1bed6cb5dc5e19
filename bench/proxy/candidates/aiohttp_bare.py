"""Candidate: bare aiohttp server and client, the floor of the aiohttp stack.

The real proxy (``pdsupervisord.proxy``) runs on the same stack and adds
picking, leases, retries, metrics and one log line per request; the gap
between the two is what those cost.
"""

from __future__ import annotations

import json
import sys

import aiohttp
from aiohttp import web
from common import DECODE_URL, PREFILL_URL, decode_body, prefill_body

_HEADERS = {"Content-Type": "application/json"}
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _session(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
    app[SESSION] = aiohttp.ClientSession(connector=connector)
    yield
    await app[SESSION].close()


async def generate(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    session = request.app[SESSION]
    async with session.post(
        PREFILL_URL + request.path, data=prefill_body(body), headers=_HEADERS
    ) as p:
        answer = await p.read()
    async with session.post(
        DECODE_URL + request.path, data=decode_body(body, answer), headers=_HEADERS
    ) as d:
        if body.get("stream") is not True:
            return web.Response(body=await d.read(), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in d.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def main() -> None:
    loop = sys.argv[2] if len(sys.argv) > 2 else "asyncio"
    app = web.Application()
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    runner = None
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only this variant needs it

        runner = uvloop.new_event_loop()
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        handler_cancellation=True,
        loop=runner,
    )


if __name__ == "__main__":
    main()
