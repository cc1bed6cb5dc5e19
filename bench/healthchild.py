"""The tiny child every supervisor in the benchmarks runs: it answers HTTP 200.

It accepts a ``vllm serve`` style command line and only reads ``--port``, so
pdsupervisord can run it as an engine (its probes need ``/health`` to answer)
and circus and supervisord can run the very same program. Only the standard
library is imported, and the interpreter is meant to be started with ``-I -S``
so that start-up and memory stay close to those of ``sleep``. Any request,
whatever its path, gets an empty ``200 OK``; SIGTERM exits 0 at once.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys

_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _port(argv: list[str]) -> int:
    """The value after ``--port``; exits 2 (like argparse) when it is missing."""
    try:
        return int(argv[argv.index("--port") + 1])
    except (ValueError, IndexError):
        sys.stderr.write("usage: healthchild.py [...] --port PORT [...]\n")
        raise SystemExit(2) from None


def _answer(conn: socket.socket) -> None:
    """Read whatever the request is (one recv is enough for a probe), reply."""
    with conn:
        try:
            conn.recv(65536)
            conn.sendall(_REPLY)
        except OSError:
            pass  # the prober gave up or reset: nothing to answer


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", _port(sys.argv)))
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for _ in selector.select():
            conn, _addr = listener.accept()
            conn.settimeout(2.0)
            _answer(conn)


if __name__ == "__main__":
    main()
