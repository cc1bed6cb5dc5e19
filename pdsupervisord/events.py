"""One event type, fanned out to structlog and to the ZeroMQ PUB socket.

Every state transition and every notable daemon action becomes one
:class:`Event` with a sequence number, so a subscriber that sees a gap knows
it missed something and can ask for ``status``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["Event", "EventBus"]

log = structlog.get_logger("pdsupervisord.events")


@dataclass(frozen=True)
class Event:
    """Something that happened to an instance or to the daemon.

    Attributes:
        seq: Strictly increasing per daemon run, starting at 1.
        time: Unix time.
        topic: ``instance.<name>.<event>`` or ``daemon.<event>``.
        instance: Instance name, or None for daemon events.
        old: Previous state, when the event is a transition.
        new: New state, when the event is a transition.
        reason: Why: ``commanded``, ``crashed``, ``startup_timeout``, ...
        detail: Extra fields (pid, exit code, signal, ...).
    """

    seq: int
    time: float
    topic: str
    instance: str | None = None
    old: str | None = None
    new: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The wire form published on the event socket."""
        return {
            "seq": self.seq,
            "time": self.time,
            "topic": self.topic,
            "instance": self.instance,
            "old": self.old,
            "new": self.new,
            "reason": self.reason,
            **self.detail,
        }


Sink = Callable[[Event], None]

#: States whose arrival is logged as a warning: someone may need to act.
_TROUBLE = frozenset({"backoff", "fatal", "exited", "unready"})


class EventBus:
    """Numbers events and hands each to every sink; never blocks.

    Sinks must not raise; one that does is logged and kept, because losing
    the event stream over one bad frame would be worse.
    """

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._sinks: list[Sink] = []

    def subscribe(self, sink: Sink) -> None:
        """Add ``sink``; it is called synchronously for every later event."""
        self._sinks.append(sink)

    def emit(
        self,
        topic: str,
        *,
        instance: str | None = None,
        old: str | None = None,
        new: str | None = None,
        reason: str | None = None,
        **detail: Any,
    ) -> Event:
        """Create, log and publish one event; returns it."""
        event = Event(
            next(self._seq), time.time(), topic, instance, old, new, reason, detail
        )
        emit = log.warning if new in _TROUBLE else log.info
        emit(topic, instance=instance, old=old, new=new, reason=reason, **detail)
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not stop the supervisor
                log.exception("event.sink_failed", topic=topic)
        return event


def encode(event: Event) -> list[bytes]:
    """Two frames for the PUB socket: topic, then the JSON body."""
    return [event.topic.encode(), json.dumps(event.to_json()).encode()]
