"""The producer's KV blocks, kept for remote decoders until pulled or expired.

Mirrors how a real producer pins a finished prefill's blocks: they stay
allocated until the decoder that pulled them says it is done, naming the
request, or until the abort timeout (``PDSD_ENGINE_KV_TIMEOUT``, vLLM's 120 s).
A pull that names another request id gets the blocks but does not free them,
which is what happens when a proxy sends P and D different ``X-Request-Id``\\ s
(facts §4, step 3).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from structlog.typing import FilteringBoundLogger

from pdsupervisord.engine.errors import KVTransferError

__all__ = ["KVStore"]


@dataclass
class _Entry:
    block_ids: tuple[int, ...]
    expiry: asyncio.TimerHandle


class KVStore:
    """Blocks held per request id. Must be used inside a running event loop.

    Args:
        timeout: Seconds an entry is kept when nobody frees it.
        on_change: Called with the number of blocks held after every change.
    """

    def __init__(self, timeout: float, on_change: Callable[[int], None]) -> None:
        self._timeout = timeout
        self._on_change = on_change
        self._blocks: dict[int, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._next_id = itertools.count(1)
        self._log: FilteringBoundLogger = structlog.get_logger("engine.kv")

    @property
    def blocks_held(self) -> int:
        """Number of blocks currently held."""
        return len(self._blocks)

    def put(self, request_id: str, blocks: Sequence[str]) -> tuple[int, ...]:
        """Keep ``blocks`` for ``request_id``, replacing an earlier entry.

        Returns:
            The ids given to the blocks, in order.
        """
        self._free(request_id, "replaced")
        block_ids = tuple(next(self._next_id) for _ in blocks)
        self._blocks.update(zip(block_ids, blocks, strict=True))
        expiry = asyncio.get_running_loop().call_later(
            self._timeout, self._free, request_id, "expired"
        )
        self._entries[request_id] = _Entry(block_ids, expiry)

        self._log.info("kv.stored", request_id=request_id, blocks=len(block_ids))
        self._on_change(self.blocks_held)
        return block_ids

    def take(self, request_id: str, block_ids: Sequence[int]) -> list[str]:
        """Hand out blocks to a decoder and free them if ``request_id`` owns them.

        Raises:
            KVTransferError: When a block id is not held (freed, expired or
                never stored).
        """
        missing = [b for b in block_ids if b not in self._blocks]
        if missing:
            raise KVTransferError(
                f"unknown KV blocks {missing} for request {request_id} "
                "(freed, expired or never stored)"
            )
        blocks = [self._blocks[b] for b in block_ids]

        entry = self._entries.get(request_id)
        if entry is not None and set(block_ids) <= set(entry.block_ids):
            self._free(request_id, "pulled")
        else:
            # Like the real connector, a "done" naming an unknown request
            # cannot release anything: the blocks wait for the timeout.
            self._log.warning(
                "kv.done_for_unknown_request",
                request_id=request_id,
                blocks=len(blocks),
                timeout_s=self._timeout,
            )
        return blocks

    def _free(self, request_id: str, reason: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        entry.expiry.cancel()
        for block_id in entry.block_ids:
            self._blocks.pop(block_id, None)

        log = self._log.warning if reason == "expired" else self._log.info
        log(
            "kv.freed",
            request_id=request_id,
            reason=reason,
            blocks_held=len(self._blocks),
        )
        self._on_change(self.blocks_held)
