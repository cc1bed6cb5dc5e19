"""Fast mock vLLM backends for the proxy benchmark: no artificial delay.

One process listens on one or more ports of 127.0.0.1 and answers every
request at once, so that what the benchmark measures is the proxy:

- ``POST /v1/completions`` and ``/v1/chat/completions`` whose body asks for a
  remote decode (``"do_remote_decode": true``, the prefill leg): a JSON
  completion of one token with ``kv_transfer_params``.
- the same routes with ``"stream": true``: a ``text/event-stream`` of
  ``--tokens`` events, each written on its own (chunked encoding), then
  ``data: [DONE]``.
- the same routes otherwise: a JSON completion.
- ``GET /health``: 200, empty; ``GET /v1/models``: one model.

It parses just enough HTTP/1.1 for keep-alive clients (wrk, aiohttp, httpx,
the Rust router): a header block and a ``Content-Length`` body, one request
at a time per connection. It looks at the body's bytes instead of decoding
JSON, to stay cheap.

Run: ``python bench/proxy/mock_backend.py --port 9001 --port 9002``; it
prints ``ready`` on stdout once every port listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

_HEADER_END = b"\r\n\r\n"
_MAX_HEADER = 64 * 1024


def _json_response(body: bytes) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answers:
    """Canned answers, built once."""

    def __init__(self, port: int, tokens: int) -> None:
        completion = {
            "id": "cmpl-bench",
            "object": "text_completion",
            "model": "bench",
            "choices": [{"index": 0, "text": " hi", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
        }
        prefill = dict(completion)
        prefill["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [1, 2, 3],
            "remote_engine_id": f"bench-{port}",
            "remote_host": "127.0.0.1",
            "remote_port": port,
            "remote_tp_size": 1,
        }
        whole = dict(completion)
        whole["choices"] = [
            {"index": 0, "text": " tok" * tokens, "finish_reason": "length"}
        ]
        self.prefill = _json_response(json.dumps(prefill).encode())
        self.whole = _json_response(json.dumps(whole).encode())
        self.health = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        models = {"object": "list", "data": [{"id": "bench", "object": "model"}]}
        self.models = _json_response(json.dumps(models).encode())
        self.not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        event = {
            "id": "cmpl-bench",
            "object": "text_completion",
            "model": "bench",
            "choices": [{"index": 0, "text": " tok", "finish_reason": None}],
        }
        self.stream_events = [
            _chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        ] * tokens
        self.stream_end = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class MockProtocol(asyncio.Protocol):
    """One client connection: parse requests, write canned answers."""

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._one_request():
            pass

    def _one_request(self) -> bool:
        end = self._buffer.find(_HEADER_END)
        if end < 0:
            if len(self._buffer) > _MAX_HEADER:
                self._close()
            return False
        head = self._buffer[:end]
        length = 0
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = lower.find(b"\r\n", at + 2)
            value = lower[at + 17 : stop if stop >= 0 else len(lower)]
            length = int(value.strip())
        total = end + 4 + length
        if len(self._buffer) < total:
            return False
        body = self._buffer[end + 4 : total]
        self._buffer = self._buffer[total:]
        self._answer(head, body)
        return True

    def _answer(self, head: bytes, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        answers = self._answers
        line = head[: head.find(b"\r\n")]
        if line.startswith(b"GET /health"):
            transport.write(answers.health)
        elif line.startswith(b"GET /v1/models"):
            transport.write(answers.models)
        elif not line.startswith(b"POST /v1/"):
            transport.write(answers.not_found)
        elif b'"do_remote_decode": true' in body or b'"do_remote_decode":true' in body:
            transport.write(answers.prefill)
        elif b'"stream": true' in body or b'"stream":true' in body:
            transport.write(answers.stream_head)
            self._stream(transport, 0)
        else:
            transport.write(answers.whole)

    def _stream(self, transport: asyncio.Transport, index: int) -> None:
        # One event per turn of the event loop, as an engine emits tokens:
        # the proxy reads them one by one instead of in one lump.
        events = self._answers.stream_events
        if transport.is_closing():
            return
        if index == len(events):
            transport.write(self._answers.stream_end)
            return
        transport.write(events[index])
        asyncio.get_running_loop().call_soon(self._stream, transport, index + 1)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _serve(ports: list[int], tokens: int) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in ports:
        answers = Answers(port, tokens)
        server = await loop.create_server(
            lambda a=answers: MockProtocol(a), "127.0.0.1", port, backlog=1024
        )
        servers.append(server)
    sys.stdout.write("ready\n")
    sys.stdout.flush()

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    """Parse the ports and serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional; a bench extra

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_serve(args.port, args.tokens))


if __name__ == "__main__":
    main()
