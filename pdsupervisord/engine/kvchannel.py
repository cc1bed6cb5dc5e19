"""The KV side channel: a producer serves its blocks, a decoder pulls them.

Real transfers go device to device (HCCL, UCX, RDMA) after a handshake over a
side channel; the stand-in moves the block digests over plain TCP on the
side-channel port, so a wrong host, a closed port or a dead producer fails
the decoder's request exactly where a broken P-D link would. The wire format
is in :mod:`pdsupervisord.engine.channel`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog
from structlog.typing import FilteringBoundLogger

from pdsupervisord.engine.channel import LINE_LIMIT, encode, read_message
from pdsupervisord.engine.errors import ChannelError, KVTransferError
from pdsupervisord.engine.kvstore import KVStore

__all__ = ["PULL_TIMEOUT", "pull_blocks", "serve_side_channel"]

#: Deadline of one pull, connect included. A guess: loopback pulls take
#: milliseconds, and a peer that accepts but never answers must not hold a
#: decode request for ever.
PULL_TIMEOUT = 10.0

_log: FilteringBoundLogger = structlog.get_logger("engine.kv")


async def serve_side_channel(
    store: KVStore, host: str, ports: Sequence[int], link_down: bool = False
) -> list[asyncio.Server]:
    """Listen on every port of the side channel.

    With ``link_down`` (fault ``kv_link_down``) every connection is dropped
    unanswered, as over a broken P→D network path.

    Returns:
        The listening servers.

    Raises:
        OSError: When a port cannot be bound; servers already started are
            closed first.
    """
    servers: list[asyncio.Server] = []
    try:
        for port in ports:
            servers.append(
                await asyncio.start_server(
                    lambda r, w: _serve_peer(store, r, w, link_down),
                    host,
                    port,
                    limit=LINE_LIMIT,
                )
            )
    except OSError:
        for server in servers:
            server.close()
        raise
    return servers


async def pull_blocks(
    host: str, port: int, request_id: str, block_ids: Sequence[int]
) -> list[str]:
    """Pull blocks from a producer and tell it the request is done.

    Raises:
        KVTransferError: When the producer cannot be reached, does not answer
            within :data:`PULL_TIMEOUT`, or refuses the pull.
    """
    peer = f"{host}:{port}"
    try:
        reply = await asyncio.wait_for(
            _exchange(host, port, request_id, block_ids), PULL_TIMEOUT
        )
    except asyncio.TimeoutError as exc:
        raise KVTransferError(
            f"no answer from {peer} within {PULL_TIMEOUT:g} s"
        ) from exc
    except (OSError, ChannelError) as exc:
        raise KVTransferError(f"KV pull from {peer} failed: {exc}") from exc

    if reply is None:
        raise KVTransferError(f"{peer} closed the connection without answering")
    if not reply.get("ok"):
        raise KVTransferError(f"{peer} refused the pull: {reply.get('error')}")
    blocks = reply.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != len(block_ids):
        raise KVTransferError(f"{peer} sent a malformed block list")
    return [str(b) for b in blocks]


async def _exchange(
    host: str, port: int, request_id: str, block_ids: Sequence[int]
) -> dict[str, object] | None:
    reader, writer = await asyncio.open_connection(host, port, limit=LINE_LIMIT)
    try:
        request = {"op": "pull", "request_id": request_id, "block_ids": list(block_ids)}
        writer.write(encode(request))
        await writer.drain()
        return await read_message(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _serve_peer(
    store: KVStore,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    link_down: bool = False,
) -> None:
    peer = writer.get_extra_info("peername")
    if link_down:
        _log.warning("kv.link_down", peer=str(peer))
        writer.close()
        return
    try:
        while (message := await read_message(reader)) is not None:
            writer.write(encode(_answer(store, message, peer)))
            await writer.drain()
    except (OSError, ChannelError) as exc:
        # A decoder that hangs up or sends garbage affects only its own pull.
        _log.warning("kv.peer_error", peer=str(peer), error=str(exc))
    finally:
        writer.close()


def _answer(
    store: KVStore, message: dict[str, object], peer: object
) -> dict[str, object]:
    request_id = message.get("request_id")
    block_ids = message.get("block_ids")
    if message.get("op") != "pull" or not isinstance(block_ids, list):
        return {"ok": False, "error": f"bad request {message.get('op')!r}"}
    try:
        blocks = store.take(str(request_id), [int(b) for b in block_ids])
    except (KVTransferError, ValueError, TypeError) as exc:
        _log.warning(
            "kv.pull_refused", request_id=request_id, peer=str(peer), error=str(exc)
        )
        return {"ok": False, "error": str(exc)}
    _log.info(
        "kv.pull_served", request_id=request_id, peer=str(peer), blocks=len(blocks)
    )
    return {"ok": True, "blocks": blocks}
