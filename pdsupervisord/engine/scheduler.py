"""Admission of requests: at most ``--max-num-seqs`` run, the rest wait.

Gives ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` real
meaning, so queueing shows in metrics the way it does on a busy engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["Scheduler"]


class Scheduler:
    """Counts running and waiting requests and caps the running ones.

    Args:
        max_num_seqs: Requests allowed to run at once.
    """

    def __init__(self, max_num_seqs: int) -> None:
        self._slots = asyncio.Semaphore(max_num_seqs)
        self.running = 0
        self.waiting = 0
        self.running_blocks = 0

    @contextlib.asynccontextmanager
    async def slot(self, kv_blocks: int) -> AsyncIterator[None]:
        """Wait for a free slot and hold it for the body of the ``async with``.

        Args:
            kv_blocks: KV blocks the request occupies while it runs.
        """
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1

        self.running += 1
        self.running_blocks += kv_blocks
        try:
            yield
        finally:
            self.running -= 1
            self.running_blocks -= kv_blocks
            self._slots.release()
