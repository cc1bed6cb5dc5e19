"""What every candidate proxy shares: the PD message shapes, kept minimal.

The candidates are the PD forward path and nothing else (one prefiller, one
decoder, no retries, metrics or logs), so that comparing them compares the
HTTP server and client stacks doing the same work: decode the client's JSON,
send the prefill leg, decode its answer, send the decode leg, relay.
"""

from __future__ import annotations

import json
import os
from typing import Any

PREFILL_URL = os.environ.get("BENCH_PREFILL", "http://127.0.0.1:9001")
DECODE_URL = os.environ.get("BENCH_DECODE", "http://127.0.0.1:9002")

_KV_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict[str, Any]) -> bytes:
    """The prefill leg's body."""
    leg = dict(body)
    leg.update(stream=False, max_tokens=1, min_tokens=1)
    leg.pop("stream_options", None)
    leg["kv_transfer_params"] = _KV_REQUEST
    return json.dumps(leg).encode()


def decode_body(body: dict[str, Any], answer: bytes) -> bytes:
    """The decode leg's body: the client's with the prefiller's params."""
    params = json.loads(answer)["kv_transfer_params"]
    return json.dumps({**body, "kv_transfer_params": params}).encode()
