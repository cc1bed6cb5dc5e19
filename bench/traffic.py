"""Client-side probes and traffic for the stand-in benches, with timestamps.

:class:`FirstHealthy` polls one ``/health`` in a thread and keeps the first
moment it answered 200; :class:`RequestLoop` sends one-token completions to
the proxy at a fixed interval and keeps (request id, sent, answered, status)
for each. :func:`log_events` reads a structlog JSON log (the daemon's stderr,
the proxy's log file) into (unix time, record) pairs.
"""

from __future__ import annotations

import datetime
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FirstHealthy", "RequestLoop", "Sent", "completion", "log_events"]


def _get_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class FirstHealthy(threading.Thread):
    """Poll ``GET /health`` every ``period`` s until 200; keep that time."""

    def __init__(self, port: int, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.period = period
        self.at: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        """Poll until healthy or stopped."""
        while not self._halt.is_set():
            if _get_ok(self.port, "/health"):
                self.at = time.time()
                return
            time.sleep(self.period)

    def stop(self) -> None:
        """Stop polling (idempotent)."""
        self._halt.set()
        self.join(5)


def completion(conn: http.client.HTTPConnection, request_id: str) -> int:
    """One ``max_tokens: 1`` completion through ``conn``; the HTTP status."""
    body = json.dumps({"model": "bench", "prompt": "hello", "max_tokens": 1})
    conn.request(
        "POST",
        "/v1/completions",
        body,
        {"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    response = conn.getresponse()
    response.read()
    return response.status


@dataclass(frozen=True)
class Sent:
    """One request of a :class:`RequestLoop`."""

    request_id: str
    sent: float
    answered: float
    status: int


class RequestLoop(threading.Thread):
    """Sequential completions to the proxy, one every ``interval`` seconds.

    Requests that fail to connect are recorded with status 0, so the loop
    can also wait for a proxy that is not listening yet.
    """

    def __init__(self, port: int, prefix: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.prefix = prefix
        self.interval = interval
        self.sent: list[Sent] = []
        self._halt = threading.Event()

    def run(self) -> None:
        """Send until stopped."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        seq = 0
        while not self._halt.is_set():
            seq += 1
            request_id = f"{self.prefix}-{seq}"
            sent = time.time()
            try:
                status = completion(conn, request_id)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                status = 0
            self.sent.append(Sent(request_id, sent, time.time(), status))
            self._halt.wait(max(0.0, self.interval - (time.time() - sent)))
        conn.close()

    def first_ok(self) -> Sent | None:
        """The first request answered 200, if any."""
        return next((s for s in list(self.sent) if s.status == 200), None)

    def stop(self) -> None:
        """Stop sending (idempotent)."""
        self._halt.set()
        self.join(15)


def _unix(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def log_events(path: Path) -> Iterator[tuple[float, dict[str, Any]]]:
    """(unix time, record) for every JSON line with a ``timestamp``."""
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "timestamp" in record:
            yield _unix(record["timestamp"]), record
