"""Backend pools: membership, load accounting, draining, health and ejection.

Pure logic: no sockets and no event loop. The clock is injected so the
cool-down of an ejected backend can be tested without sleeping.

A backend is in one of three states:

- ``active``: in rotation.
- ``draining``: removed by the membership API; it gets no new picks, and it
  leaves the pool once its last in-flight request has finished.
- ``ejected``: out of rotation, for one of two reasons (``ejected_by``):

  - ``connection`` (passive): a connection to it was refused or timed out.
    It gets no picks until its cool-down has passed; then it is *half-open*:
    one request at a time may try it, and the first upstream answer (or a
    passing health probe) puts it back to ``active``.
  - ``probe`` (active): its ``GET /health`` failed ``failure_threshold``
    times in a row (`pdsupervisord.proxy.health` probes every backend). It
    gets no picks at all until the probe has passed ``success_threshold``
    times in a row.

The probe's verdict (``healthy``) is kept apart from the routing state: a
draining backend is still probed, and one re-added while unhealthy comes
back ``ejected`` rather than ``active``.
"""

from __future__ import annotations

import collections
import enum
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

import structlog

from pdsupervisord.proxy.timings import LatencyHistogram

__all__ = [
    "Address",
    "Backend",
    "BackendState",
    "BackendView",
    "EjectedBy",
    "Lease",
    "Pool",
    "Role",
    "outstanding_requests",
    "outstanding_work",
]

_log = structlog.get_logger("pdsupervisord.proxy.backends")

Clock = Callable[[], float]

_MAX_PORT = 65535


class Role(enum.Enum):
    """Which leg of the PD protocol a backend serves."""

    PREFILL = "prefill"
    DECODE = "decode"


class BackendState(enum.Enum):
    """Routing state of one backend (see the module docstring)."""

    ACTIVE = "active"
    DRAINING = "draining"
    EJECTED = "ejected"


class EjectedBy(enum.Enum):
    """Why an ejected backend is out of rotation (see the module docstring)."""

    CONNECTION = "connection"
    PROBE = "probe"


_ALLOWED_TRANSITIONS: dict[BackendState, frozenset[BackendState]] = {
    BackendState.ACTIVE: frozenset({BackendState.DRAINING, BackendState.EJECTED}),
    BackendState.EJECTED: frozenset({BackendState.ACTIVE, BackendState.DRAINING}),
    BackendState.DRAINING: frozenset({BackendState.ACTIVE, BackendState.EJECTED}),
}


@dataclass(frozen=True)
class Address:
    """A backend's ``host:port``; IPv6 hosts are written in brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``host:port`` or ``[v6host]:port``.

        Raises:
            ValueError: the text is not a host and a port in 1..65535.
        """
        host, sep, port_text = text.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or any(c.isspace() or c in "/[]" for c in host):
            raise ValueError(f"instance {text!r} is not 'host:port'")
        if not port_text.isdigit() or not 0 < int(port_text) <= _MAX_PORT:
            raise ValueError(f"instance {text!r} has no valid port (1..65535)")
        return cls(host, int(port_text))

    @property
    def url(self) -> str:
        """Base URL of the backend, e.g. ``http://127.0.0.1:8100``."""
        return f"http://{self}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class BackendView:
    """A snapshot of one backend, as the membership API and metrics show it."""

    role: Role
    address: Address
    state: BackendState
    in_flight: int
    load: int
    errors: dict[str, int]
    ejected_by: EjectedBy | None = None
    healthy: bool = True
    probe_failures: int = 0
    probe_error: str | None = None
    requests: int = 0

    def as_json(self) -> dict[str, object]:
        """The JSON object ``GET /instances`` returns for this backend."""
        return {
            "type": self.role.value,
            "address": str(self.address),
            "state": self.state.value,
            "ejected_by": None if self.ejected_by is None else self.ejected_by.value,
            "in_flight": self.in_flight,
            "load": self.load,
            "requests": self.requests,
            "errors": dict(self.errors),
            "health": {
                "healthy": self.healthy,
                "failures": self.probe_failures,
                "last_error": self.probe_error,
            },
        }


class Backend:
    """One upstream vLLM instance and its live accounting.

    Mutated only on the event loop thread, so no locking is needed.
    """

    def __init__(
        self, role: Role, address: Address, cooldown: float, clock: Clock
    ) -> None:
        self.role = role
        self.address = address
        self.state = BackendState.ACTIVE
        self.ejected_by: EjectedBy | None = None
        self.in_flight = 0
        self.load = 0
        self.requests = 0
        # Requests whose KV this prefiller still holds for a decoder to pull:
        # it must not be stopped (drained) before they are done.
        self.kv_held = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.trial_in_flight = False
        self.healthy = True
        self.probe_failures = 0
        self.probe_successes = 0
        self.probe_error: str | None = None
        self.probes: collections.Counter[str] = collections.Counter()
        self.ejections: collections.Counter[str] = collections.Counter()
        # Prefillers fill the first, decoders the other two.
        self.prefill_seconds = LatencyHistogram()
        self.first_token_seconds = LatencyHistogram()
        self.e2e_seconds = LatencyHistogram()
        self._ejected_until = 0.0
        self._cooldown = cooldown
        self._clock = clock

    def eligible(self) -> bool:
        """Whether a new request may be sent here now."""
        if self.state is BackendState.ACTIVE:
            return True
        if self.state is BackendState.EJECTED:
            return (
                self.ejected_by is EjectedBy.CONNECTION
                and not self.trial_in_flight
                and self._clock() >= self._ejected_until
            )
        return False

    def mark_reachable(self) -> None:
        """Record that the backend answered a request.

        A backend ejected for a failed connection is restored; one ejected by
        its health probe stays out until the probe passes.
        """
        if self.ejected_by is EjectedBy.CONNECTION:
            self._restore("answered")

    def mark_unreachable(self, kind: str) -> None:
        """Record a failed connection (refused, timed out): eject for a while.

        Args:
            kind: the error kind to count, e.g. ``refused``.
        """
        self.errors[kind] += 1
        if self.state is BackendState.DRAINING or self.ejected_by is EjectedBy.PROBE:
            return
        self._ejected_until = self._clock() + self._cooldown
        if self.state is BackendState.EJECTED:
            _log.warning(
                "backend.ejected",
                role=self.role.value,
                backend=str(self.address),
                reason=f"half-open try failed: {kind}",
                cooldown_s=self._cooldown,
            )
            return
        self._eject(EjectedBy.CONNECTION, f"cannot connect: {kind}")

    def probe_passed(self, success_threshold: int) -> None:
        """Record a passing health probe.

        Args:
            success_threshold: passes in a row that make an unhealthy backend
                healthy again.
        """
        self.probes["ok"] += 1
        self.probe_failures = 0
        self.probe_successes += 1
        if not self.healthy and self.probe_successes >= success_threshold:
            self.healthy = True
            self.probe_error = None
            if self.ejected_by is EjectedBy.PROBE:
                self._restore(f"health probe passed {self.probe_successes} times")
        elif self.healthy and self.ejected_by is EjectedBy.CONNECTION:
            # It accepts connections again: no need to wait for the cool-down.
            self._restore("health probe passed")

    def probe_failed(self, kind: str, detail: str, failure_threshold: int) -> None:
        """Record a failing health probe.

        Args:
            kind: ``refused``, ``timeout``, ``bad_status`` or ``disconnected``.
            detail: what happened, for ``GET /instances``.
            failure_threshold: failures in a row that make the backend
                unhealthy and take it out of rotation.
        """
        self.probes[kind] += 1
        self.probe_successes = 0
        self.probe_failures += 1
        self.probe_error = detail
        if not self.healthy or self.probe_failures < failure_threshold:
            return
        self.healthy = False
        if self.state is BackendState.DRAINING:
            return
        reason = f"health probe failed {self.probe_failures} times: {detail}"
        self._eject(EjectedBy.PROBE, reason)

    def count_error(self, kind: str) -> None:
        """Count a failure of the given kind (a metrics label)."""
        self.errors[kind] += 1

    def view(self) -> BackendView:
        """A snapshot for listings and metrics."""
        return BackendView(
            self.role,
            self.address,
            self.state,
            self.in_flight,
            self.load,
            dict(self.errors),
            self.ejected_by,
            self.healthy,
            self.probe_failures,
            self.probe_error,
            self.requests,
        )

    def reactivate(self, reason: str) -> None:
        """Bring a draining backend back: active, or ejected if unhealthy."""
        if self.healthy:
            self.transition(BackendState.ACTIVE, reason)
        else:
            self._eject(EjectedBy.PROBE, f"{reason} while unhealthy")

    def transition(self, new: BackendState, reason: str) -> None:
        """Move to a new state and log the change.

        Raises:
            ValueError: the move is not in the allowed transitions.
        """
        if new not in _ALLOWED_TRANSITIONS[self.state]:
            raise ValueError(
                f"backend {self.address}: {self.state.value} -> {new.value} "
                "is not a valid transition"
            )
        old, self.state = self.state, new
        if new is not BackendState.EJECTED:
            self.ejected_by = None
        _log.info(
            "backend.state_changed",
            role=self.role.value,
            backend=str(self.address),
            old=old.value,
            new=new.value,
            reason=reason,
        )

    def _eject(self, by: EjectedBy, reason: str) -> None:
        self.ejections[by.value] += 1
        if self.state is BackendState.EJECTED:
            # Already out (say, for a refused connection): the probe's
            # verdict now decides when it comes back.
            self.ejected_by = by
            _log.warning(
                "backend.ejected",
                role=self.role.value,
                backend=str(self.address),
                reason=reason,
                ejected_by=by.value,
            )
            return
        self.transition(BackendState.EJECTED, reason)
        self.ejected_by = by

    def _restore(self, reason: str) -> None:
        if self.state is BackendState.EJECTED:
            self.transition(BackendState.ACTIVE, reason)


PickKey = Callable[[Backend], tuple[int, ...]]


def outstanding_work(backend: Backend) -> tuple[int, ...]:
    """Pick key for prefillers: in-flight prompt bytes, then request count."""
    return (backend.load, backend.in_flight)


def outstanding_requests(backend: Backend) -> tuple[int, ...]:
    """Pick key for decoders: in-flight request count."""
    return (backend.in_flight,)


class Lease:
    """One request's hold on a backend; releasing it undoes the accounting.

    Use it as a context manager so the counters are released on every path:
    success, upstream error, cancellation by a client disconnect.
    """

    def __init__(self, pool: Pool, backend: Backend, weight: int, trial: bool) -> None:
        self.backend = backend
        self.weight = weight
        self._pool = pool
        self._trial = trial
        self._released = False

    def release(self) -> None:
        """Give the backend back; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._pool._release(self.backend, self.weight, self._trial)

    def hand_off(self) -> Callable[[], None]:
        """Release the lease for load balancing but keep the backend from
        draining until the returned function is called.

        Used after a prefill: the prefiller is free to take new work, yet the
        decoder has still to pull the request's KV from it.
        """
        backend, pool = self.backend, self._pool
        backend.kv_held += 1
        self.release()
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                backend.kv_held -= 1
                pool._forget_if_drained(backend)

        return finish

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Pool:
    """The backends of one role, with least-outstanding picking.

    Ties on the pick key are broken round-robin so equal backends share the
    load instead of the first one taking everything.
    """

    def __init__(
        self,
        role: Role,
        key: PickKey,
        cooldown: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.role = role
        self._key = key
        self._cooldown = cooldown
        self._clock = clock
        self._backends: dict[Address, Backend] = {}
        self._turn = itertools.count()

    def __iter__(self) -> Iterator[Backend]:
        return iter(list(self._backends.values()))

    def get(self, address: Address) -> Backend | None:
        """The backend at this address, if it is a member."""
        return self._backends.get(address)

    def add(self, address: Address) -> Backend:
        """Add a backend, or reactivate a draining one. Idempotent."""
        backend = self._backends.get(address)
        if backend is None:
            backend = Backend(self.role, address, self._cooldown, self._clock)
            self._backends[address] = backend
            _log.info("backend.added", role=self.role.value, backend=str(address))
        elif backend.state is BackendState.DRAINING:
            backend.reactivate("added again")
        return backend

    def remove(self, address: Address) -> Backend | None:
        """Start draining a backend; an idle one leaves the pool at once.

        Returns:
            The backend, or None when the address is not a member.
        """
        backend = self._backends.get(address)
        if backend is None:
            return None
        if backend.state is not BackendState.DRAINING:
            backend.transition(BackendState.DRAINING, "removed")
        self._forget_if_drained(backend)
        return backend

    def count(self, state: BackendState) -> int:
        """How many members are in the given state."""
        return sum(1 for b in self._backends.values() if b.state is state)

    def acquire(
        self,
        weight: int = 0,
        exclude: frozenset[Address] = frozenset(),
        only: Address | None = None,
        avoid: frozenset[Address] = frozenset(),
    ) -> Lease | None:
        """Pick the eligible backend with the least outstanding work.

        Args:
            weight: work this request adds (prompt bytes for prefillers).
            exclude: addresses not to pick for this request.
            only: when set, the one backend this request is pinned to (the
                supervisor's canary tests one prefill/decode pair at a time).
            avoid: addresses to pick only when no other is eligible.

        Returns:
            A lease on the chosen backend, or None when none is eligible.
        """
        candidates = self._candidates(exclude, only)
        if not candidates:
            return None
        if avoid:
            preferred = [b for b in candidates if b.address not in avoid]
            candidates = preferred or candidates

        best = min(self._key(b) for b in candidates)
        tied = [b for b in candidates if self._key(b) == best]
        backend = tied[next(self._turn) % len(tied)]

        trial = backend.state is BackendState.EJECTED
        backend.trial_in_flight = backend.trial_in_flight or trial
        backend.in_flight += 1
        backend.requests += 1
        backend.load += weight
        return Lease(self, backend, weight, trial)

    def has_eligible(
        self, exclude: frozenset[Address] = frozenset(), only: Address | None = None
    ) -> bool:
        """Whether `acquire` with this exclusion would find a backend now."""
        return bool(self._candidates(exclude, only))

    def _candidates(
        self, exclude: frozenset[Address], only: Address | None = None
    ) -> list[Backend]:
        return [
            b
            for b in self._backends.values()
            if b.address not in exclude
            and (only is None or b.address == only)
            and b.eligible()
        ]

    def _release(self, backend: Backend, weight: int, trial: bool) -> None:
        backend.in_flight -= 1
        backend.load -= weight
        if trial:
            backend.trial_in_flight = False
        self._forget_if_drained(backend)

    def _forget_if_drained(self, backend: Backend) -> None:
        idle = (
            backend.state is BackendState.DRAINING
            and backend.in_flight == 0
            and backend.kv_held == 0
        )
        if idle and self._backends.get(backend.address) is backend:
            del self._backends[backend.address]
            _log.info(
                "backend.drained",
                role=self.role.value,
                backend=str(backend.address),
            )
