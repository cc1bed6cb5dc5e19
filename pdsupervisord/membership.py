"""Tell the proxy which prefill and decode instances are in rotation.

Talks to the built-in proxy's admin API (``POST /instances/add``,
``POST /instances/remove``), guarded by a token the daemon creates at start
and hands to the proxy in its environment. An external proxy has no such API:
its membership is its command line, fixed at start.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import structlog

from pdsupervisord.probes import connect_host

__all__ = ["TOKEN_ENV", "ProxyMembership"]

#: Environment variable through which the built-in proxy receives its token.
TOKEN_ENV = "PDSUPERVISORD_PROXY_TOKEN"

log = structlog.get_logger("pdsupervisord.membership")


class ProxyMembership:
    """Client of the proxy's membership API.

    Failures are logged and reported as False, never raised: the proxy may be
    restarting, and the daemon re-sends the whole membership when it is back.
    """

    def __init__(
        self, session: aiohttp.ClientSession, host: str, port: int, enabled: bool
    ) -> None:
        self._session = session
        self._base = f"http://{connect_host(host)}:{port}"
        self.enabled = enabled
        self.token = secrets.token_urlsafe(24)
        self.up = False

    async def add(self, role: str, address: str) -> bool:
        """Put ``address`` into the ``role`` rotation (idempotent)."""
        return await self._post("add", {"type": role, "instances": [address]}, 10.0)

    async def remove(self, role: str, address: str, drain_timeout: float) -> bool:
        """Take ``address`` out of rotation; with a timeout > 0, wait for drain."""
        body: dict[str, Any] = {"type": role, "instances": [address]}
        if drain_timeout > 0:
            body |= {"wait": True, "timeout": drain_timeout}
        return await self._post("remove", body, drain_timeout + 10.0)

    async def _post(self, verb: str, body: dict[str, Any], timeout: float) -> bool:
        if not (self.enabled and self.up):
            return False
        try:
            async with self._session.post(
                f"{self._base}/instances/{verb}",
                json=body,
                headers={"X-API-Key": self.token},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                if response.status == 200:
                    return True
                text = await response.text()
                log.warning(
                    "membership.rejected", verb=verb, status=response.status, body=text
                )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("membership.failed", verb=verb, error=repr(exc), **body)
        return False
