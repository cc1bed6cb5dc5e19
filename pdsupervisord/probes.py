"""Health probes: they report facts (reachable, healthy) and decide nothing."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

__all__ = ["connect_host", "http_ok", "port_open"]


def connect_host(host: str) -> str:
    """The address to connect to for a bind address (wildcards -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


async def http_ok(
    session: aiohttp.ClientSession, host: str, port: int, path: str, timeout: float
) -> bool:
    """True when ``GET http://host:port/path`` answers 200 within ``timeout``."""
    url = f"http://{connect_host(host)}:{port}{path}"
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        # Refused, reset or slow: all mean "not healthy yet" to a probe.
        return False


async def port_open(host: str, port: int, timeout: float) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within ``timeout``."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(connect_host(host), port), timeout
        )
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
