"""Wire format of the stand-in's two channels, and the engine child's spec.

Both the API-server-to-engine-child channel (a Unix socket pair) and the KV
side channel between engines (TCP) carry one JSON object per line.

API server -> engine child, first line: an :class:`EngineSpec`. Then requests,
each answered by a reply with the same ``id``::

    {"id": 1, "op": "store", "request_id": "r1", "blocks": ["9f..", ...]}
    {"id": 1, "ok": true, "block_ids": [1, 2]}

    {"id": 2, "op": "pull", "request_id": "r1", "host": "127.0.0.1",
     "port": 5557, "block_ids": [1, 2]}
    {"id": 2, "ok": true, "blocks": ["9f..", ...]}
    {"id": 2, "ok": false, "error": "connection refused by 127.0.0.1:5557"}

Engine child -> API server, unprompted events (no ``id``)::

    {"event": "ready", "kv_host": "127.0.0.1", "kv_ports": [5557]}
    {"event": "failed", "reason": "device 0 is in use by pid 4242"}
    {"event": "kv", "blocks_held": 3}

KV side channel, decoder's engine child -> producer's engine child::

    {"op": "pull", "request_id": "r1", "block_ids": [1, 2]}
    {"ok": true, "blocks": ["9f..", ...]}
    {"ok": false, "error": "unknown KV blocks [2] (freed or never stored)"}
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from typing import Any

from pdsupervisord.engine.errors import ChannelError

__all__ = ["LINE_LIMIT", "EngineSpec", "encode", "read_message"]

#: Longest line accepted. Block lists of long prompts exceed asyncio's 64 KiB
#: default: 40k tokens make 2,500 blocks of ~20 bytes each.
LINE_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class EngineSpec:
    """What the API server tells its engine child to do.

    Attributes:
        devices: Device ids to lock.
        lock_dir: Directory of the lock files.
        load_seconds: Simulated model load time.
        kv_timeout: Seconds un-pulled KV blocks are kept.
        kv_host: Side-channel host, None when there is no KV connector.
        kv_ports: Side-channel ports, one per tensor-parallel rank.
        setsid: Leave the process group (fault ``engine_setsid``).
        link_down: Drop every KV pull (fault ``kv_link_down``).
    """

    devices: tuple[str, ...]
    lock_dir: str
    load_seconds: float
    kv_timeout: float
    kv_host: str | None
    kv_ports: tuple[int, ...]
    setsid: bool
    link_down: bool = False

    def to_message(self) -> dict[str, Any]:
        """The spec as a channel message."""
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> EngineSpec:
        """Rebuild a spec sent by :meth:`to_message`.

        Raises:
            ChannelError: When a field is missing or of the wrong type.
        """
        try:
            return cls(
                devices=tuple(str(d) for d in message["devices"]),
                lock_dir=str(message["lock_dir"]),
                load_seconds=float(message["load_seconds"]),
                kv_timeout=float(message["kv_timeout"]),
                kv_host=message["kv_host"],
                kv_ports=tuple(int(p) for p in message["kv_ports"]),
                setsid=bool(message["setsid"]),
                link_down=bool(message.get("link_down", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ChannelError(f"invalid engine spec: {exc!r}") from exc


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line of JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Read the next message; None at end of stream.

    Raises:
        ChannelError: When the line is not a JSON object or is too long.
    """
    try:
        line = await reader.readline()
    except (asyncio.LimitOverrunError, ValueError) as exc:
        raise ChannelError(f"line longer than {LINE_LIMIT} bytes") from exc
    if not line:
        return None
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ChannelError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(message, dict):
        raise ChannelError(f"not a JSON object: {line[:80]!r}")
    return message
