"""The end-to-end canary: one-token requests through the proxy, per P/D pair.

``/health`` cannot see a broken P→D link (LLMDataDist and Mooncake link on
the first request, facts §5), so on a period the supervisor sends one tiny
completion through the proxy for every pair of a ready prefill and a ready decode,
pinned to that pair with the proxy's admin-only ``X-PD-Prefill`` and
``X-PD-Decode`` headers. A pair whose request fails is reported broken (an
event and the ``status`` reply) until a later round succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

import aiohttp

from pdsupervisord.probes import connect_host

__all__ = ["Pair", "check_pair"]

_ids = itertools.count(1)


@dataclass(frozen=True)
class Pair:
    """A prefill instance and a decode instance, by name and address."""

    prefill: str
    prefill_address: str
    decode: str
    decode_address: str


async def check_pair(
    session: aiohttp.ClientSession,
    proxy: tuple[str, int],
    *,
    token: str,
    model: str,
    pair: Pair,
    timeout: float,
) -> str | None:
    """Send one pinned one-token completion; None when it works, else why not."""
    host, port = proxy
    headers = {
        "X-API-Key": token,
        "X-PD-Prefill": pair.prefill_address,
        "X-PD-Decode": pair.decode_address,
        "X-Request-Id": f"pdsupervisord-canary-{next(_ids)}",
    }
    body = {"model": model, "prompt": "canary", "max_tokens": 1}
    url = f"http://{connect_host(host)}:{port}/v1/completions"
    try:
        async with session.post(
            url,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            text = await response.text()
            if response.status == 200 and '"choices"' in text:
                return None
            return f"HTTP {response.status}: {text[:300]}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
