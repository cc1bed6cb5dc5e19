"""Active health probes: ``GET /health`` on every backend, every period.

Each round probes every member of both pools at once, each probe bounded by
the timeout, and reports to `Backend.probe_passed` / `Backend.probe_failed`,
which apply the failure and success thresholds (see
`pdsupervisord.proxy.backends`). The next round starts one period after the
previous one started, or at once when a round took longer.

Probes use a connection pool of their own that never reuses a connection:
each probe opens one, as a new request would, so a backend whose listening
socket no longer accepts fails its probe even while old keep-alive
connections to it still work.

The probe only sees what ``/health`` sees: vLLM's answers 200 while its
engine lives, which says nothing about a broken P→D KV link (the
supervisor's canary covers that, and so does the retry on another pair).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import structlog

from pdsupervisord.proxy.backends import Backend, Pool

__all__ = ["HealthProber", "ProbeSettings"]

_log = structlog.get_logger("pdsupervisord.proxy.health")

# Error bodies quoted in a failed probe's detail up to this many characters.
_SNIPPET_CHARS = 120


@dataclass(frozen=True)
class ProbeSettings:
    """How the backends are probed.

    Attributes:
        period: seconds between the starts of two rounds; 0 disables probes.
        timeout: seconds one probe may take, connect included.
        failure_threshold: failures in a row that eject a backend.
        success_threshold: passes in a row that bring it back.
        path: the path probed.
    """

    period: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 2
    path: str = "/health"

    @property
    def enabled(self) -> bool:
        """Whether probes run at all."""
        return self.period > 0


class HealthProber:
    """Probes the members of the pools in the background.

    `start` and `close` must be awaited on the loop that serves requests.
    """

    def __init__(self, settings: ProbeSettings, pools: Iterable[Pool]) -> None:
        self._settings = settings
        self._pools = tuple(pools)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start probing (nothing happens when probes are disabled)."""
        if not self._settings.enabled:
            return
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )
        self._task = asyncio.create_task(self._run(), name="pdproxy-health")

    async def close(self) -> None:
        """Stop probing and close the probes' connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def probe_all(self) -> None:
        """Run one round: probe every member of every pool once, at once."""
        backends = [backend for pool in self._pools for backend in pool]
        await asyncio.gather(*(self._probe(backend) for backend in backends))

    async def _run(self) -> None:
        period = self._settings.period
        while True:
            started = time.monotonic()
            await self.probe_all()
            await asyncio.sleep(max(0.0, started + period - time.monotonic()))

    async def _probe(self, backend: Backend) -> None:
        assert self._session is not None
        settings = self._settings
        url = backend.address.url + settings.path
        timeout = aiohttp.ClientTimeout(total=settings.timeout)
        try:
            async with self._session.get(url, timeout=timeout) as response:
                status = response.status
                text = "" if status == 200 else await response.text(errors="replace")
        except asyncio.TimeoutError:
            self._failed(backend, "timeout", f"no answer in {settings.timeout} s")
            return
        except aiohttp.ClientConnectorError as exc:
            self._failed(backend, "refused", f"cannot connect: {exc.strerror}")
            return
        except aiohttp.ClientError as exc:
            self._failed(backend, "disconnected", f"connection lost: {exc!r}")
            return

        if status == 200:
            was_healthy = backend.healthy
            backend.probe_passed(settings.success_threshold)
            if not was_healthy and backend.healthy:
                _log.info(
                    "backend.healthy",
                    role=backend.role.value,
                    backend=str(backend.address),
                    successes=backend.probe_successes,
                )
        else:
            snippet = text[:_SNIPPET_CHARS].strip()
            detail = f"{settings.path} answered {status}" + (
                f": {snippet}" if snippet else ""
            )
            self._failed(backend, "bad_status", detail)

    def _failed(self, backend: Backend, kind: str, detail: str) -> None:
        was_healthy = backend.healthy
        backend.probe_failed(kind, detail, self._settings.failure_threshold)
        if was_healthy and not backend.healthy:
            _log.warning(
                "backend.unhealthy",
                role=backend.role.value,
                backend=str(backend.address),
                failures=backend.probe_failures,
                error=detail,
            )
