"""The relay's bookkeeping (pure): reservations, circuits and their limits.

Theory of operation.  A relay (an elected proxy, or the bootstrap fallback)
carries circuits to peers that cannot be dialled (workers behind NAT).  Such a
peer first *reserves* a slot; a reservation lasts ``reservation_ttl_s`` and is
renewed by reserving again before it expires.  A *circuit* is one relayed
connection from a source peer to a reserved destination; it carries at most
``circuit_bytes`` (both directions together) and lives at most
``circuit_duration_s``, after which the shell resets it.

::

    reserve(peer, ip, now, allowed)  -> Reserved(expires) | Refusal(status, reason)
    open_circuit(src, src_ip, dst, now) -> Circuit | Refusal
    account(circuit, n, now)         -> None | Refusal        (after each chunk relayed)
    close_circuit(circuit)                                    (always, in a finally)
    expire(now)                                               (drops lapsed reservations)

Every refusal carries a circuit-relay-v2 status code and a stable reason, so
the peer on the other side gets a typed answer (:class:`RelayRefused`).  No
clock, no I/O: ``now`` comes in, decisions go out.
"""

from __future__ import annotations

from collections import defaultdict, deque
from enum import IntEnum

import attrs

from .errors import TransportError

__all__ = [
    "Circuit",
    "RelayBook",
    "RelayLimits",
    "RelayRefused",
    "RelayStats",
    "Refusal",
    "Reserved",
    "Status",
]


class Status(IntEnum):
    """Circuit relay v2 status codes (libp2p specs, relay/circuit-v2.md)."""

    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


class RelayRefused(TransportError):
    """A relay refused a reservation or a circuit; ``status`` and ``reason`` say why."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"relay refused ({reason}): {detail}" if detail else f"relay refused ({reason})")
        self.status = status
        self.reason = reason
        self.detail = detail


@attrs.frozen
class RelayLimits:
    """What one relay grants.  Units in the comments."""

    reservation_ttl_s: float = 900.0  # s a reservation lasts (renewed by reserving again)
    max_reservations: int = 256  # reservations held at once
    max_reservations_per_ip: int = 8  # reservations held at once from one IP address
    reserve_rate: int = 6  # reserve requests one peer may make ...
    reserve_window_s: float = 60.0  # ... per this many seconds
    max_circuits: int = 512  # circuits open at once
    max_circuits_per_destination: int = 32  # circuits open at once to one reserved peer
    max_circuits_per_source: int = 8  # circuits open at once from one source peer
    circuit_duration_s: float = 1800.0  # s one circuit may stay open (0: unlimited)
    circuit_bytes: int = 256 << 20  # bytes one circuit may carry, both directions (0: unlimited)


@attrs.frozen
class Refusal:
    status: Status
    reason: str  # stable code: not_a_worker, rate_limited, relay_full, ip_full, no_reservation, ...
    detail: str = ""

    def error(self) -> RelayRefused:
        return RelayRefused(int(self.status), self.reason, self.detail)


@attrs.frozen
class Reserved:
    peer: str
    expires: float  # the relay's clock
    renewed: bool


@attrs.define(eq=False)
class Circuit:
    id: int
    src: str
    dst: str
    opened: float
    deadline: float | None  # the relay's clock; None = no duration limit
    budget: int | None  # bytes left; None = no data limit
    carried: int = 0  # bytes relayed so far, both directions


@attrs.define
class _Reservation:
    peer: str
    ip: str
    expires: float


@attrs.frozen
class RelayStats:
    reservations: int
    circuits: int
    circuits_opened: int
    bytes_relayed: int
    refused: dict[str, int]  # reason -> count


class RelayBook:
    """Reservations and circuits of one relay (see the module docstring)."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.limits = limits or RelayLimits()
        self._reservations: dict[str, _Reservation] = {}
        self._attempts: dict[str, deque[float]] = defaultdict(deque)
        self._circuits: dict[int, Circuit] = {}
        self._next_id = 1
        self._opened = 0
        self._bytes = 0
        self._refused: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ reservations

    def _refuse(self, status: Status, reason: str, detail: str = "") -> Refusal:
        self._refused[reason] += 1
        return Refusal(status, reason, detail)

    def reserve(self, peer: str, ip: str, now: float, *, allowed: bool = True) -> Reserved | Refusal:
        """A reservation for ``peer`` (new or renewed), or why not.

        ``allowed`` is the shell's policy verdict (a proxy relays only for the
        workers attached to it); the rate limit counts refused requests too, so
        a flood is cut off before any policy work is repeated.
        """
        self.expire(now)
        lim = self.limits
        window = self._attempts[peer]
        while window and window[0] <= now - lim.reserve_window_s:
            window.popleft()
        if len(window) >= lim.reserve_rate:
            return self._refuse(
                Status.RESOURCE_LIMIT_EXCEEDED,
                "rate_limited",
                f"more than {lim.reserve_rate} reservations in {lim.reserve_window_s:.0f} s",
            )
        window.append(now)
        if not allowed:
            return self._refuse(Status.PERMISSION_DENIED, "not_a_worker", "this relay serves its own workers")
        held = self._reservations.get(peer)
        expires = now + lim.reservation_ttl_s
        if held is not None:
            held.expires = expires
            held.ip = ip
            return Reserved(peer, expires, renewed=True)
        if len(self._reservations) >= lim.max_reservations:
            return self._refuse(
                Status.RESERVATION_REFUSED, "relay_full", f"{lim.max_reservations} reservations held"
            )
        same_ip = sum(1 for r in self._reservations.values() if r.ip == ip)
        if same_ip >= lim.max_reservations_per_ip:
            return self._refuse(
                Status.RESOURCE_LIMIT_EXCEEDED,
                "ip_full",
                f"{lim.max_reservations_per_ip} reservations from {ip}",
            )
        self._reservations[peer] = _Reservation(peer, ip, expires)
        return Reserved(peer, expires, renewed=False)

    def release(self, peer: str) -> bool:
        """Drop ``peer``'s reservation (it left, or is no longer a worker here)."""
        return self._reservations.pop(peer, None) is not None

    def has_reservation(self, peer: str, now: float) -> bool:
        r = self._reservations.get(peer)
        return r is not None and r.expires > now

    def expire(self, now: float) -> list[str]:
        """Drop lapsed reservations and stale rate-limit windows; return the peers dropped."""
        gone = [p for p, r in self._reservations.items() if r.expires <= now]
        for p in gone:
            del self._reservations[p]
        horizon = now - self.limits.reserve_window_s
        for p in [p for p, w in self._attempts.items() if not w or w[-1] <= horizon]:
            del self._attempts[p]
        return gone

    # ------------------------------------------------------------------ circuits

    def open_circuit(self, src: str, dst: str, now: float) -> Circuit | Refusal:
        """A circuit from ``src`` to ``dst``, or why not (``dst`` must hold a reservation)."""
        self.expire(now)
        lim = self.limits
        if src == dst:
            return self._refuse(Status.PERMISSION_DENIED, "self_circuit", "a peer cannot relay to itself")
        if not self.has_reservation(dst, now):
            return self._refuse(
                Status.NO_RESERVATION, "no_reservation", f"{dst} holds no reservation on this relay"
            )
        if len(self._circuits) >= lim.max_circuits:
            return self._refuse(Status.RESOURCE_LIMIT_EXCEEDED, "relay_busy", f"{lim.max_circuits} circuits")
        if sum(1 for c in self._circuits.values() if c.dst == dst) >= lim.max_circuits_per_destination:
            return self._refuse(
                Status.RESOURCE_LIMIT_EXCEEDED,
                "destination_busy",
                f"{lim.max_circuits_per_destination} circuits to {dst}",
            )
        if sum(1 for c in self._circuits.values() if c.src == src) >= lim.max_circuits_per_source:
            return self._refuse(
                Status.RESOURCE_LIMIT_EXCEEDED,
                "source_busy",
                f"{lim.max_circuits_per_source} circuits from {src}",
            )
        cid = self._next_id
        self._next_id += 1
        circuit = Circuit(
            cid,
            src,
            dst,
            now,
            now + lim.circuit_duration_s if lim.circuit_duration_s > 0 else None,
            lim.circuit_bytes if lim.circuit_bytes > 0 else None,
        )
        self._circuits[cid] = circuit
        self._opened += 1
        return circuit

    def account(self, circuit: Circuit, nbytes: int, now: float) -> Refusal | None:
        """Count ``nbytes`` relayed on ``circuit``; a Refusal once a limit is passed (reset it then)."""
        if circuit.deadline is not None and now > circuit.deadline:
            return self._refuse(
                Status.RESOURCE_LIMIT_EXCEEDED,
                "duration_exceeded",
                f"circuit open longer than {self.limits.circuit_duration_s:.0f} s",
            )
        if circuit.budget is not None:
            if nbytes > circuit.budget:
                circuit.budget = 0
                return self._refuse(
                    Status.RESOURCE_LIMIT_EXCEEDED,
                    "data_exceeded",
                    f"circuit carried more than {self.limits.circuit_bytes} bytes",
                )
            circuit.budget -= nbytes
        circuit.carried += nbytes
        self._bytes += nbytes
        return None

    def close_circuit(self, circuit: Circuit) -> None:
        self._circuits.pop(circuit.id, None)

    def circuits(self) -> list[Circuit]:
        return list(self._circuits.values())

    def statistics(self) -> RelayStats:
        return RelayStats(
            reservations=len(self._reservations),
            circuits=len(self._circuits),
            circuits_opened=self._opened,
            bytes_relayed=self._bytes,
            refused=dict(self._refused),
        )
