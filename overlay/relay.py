"""Circuit relay v2 (libp2p specs ``relay/circuit-v2.md``): relays, reservations, relayed dials.

Spec-compliant on the wire (the varint-delimited ``HopMessage``/``StopMessage``
protobufs py-libp2p 0.8.1 ships), our own handlers around them.  We read
py-libp2p's ``CircuitV2Protocol`` first and did not use it: it keys active
circuits by peer (two clients of one worker overwrite each other's entry, and
the first circuit to end closes the other's streams), reads the wall clock
inside its protocol logic, sleeps before answering, and has no hook for the
policy a proxy needs (relay only for its own workers) nor for counting bytes.

- :class:`RelayHop` (relays: elected proxies and the bootstrap fallback)
  answers ``RESERVE`` and ``CONNECT`` on ``/libp2p/circuit/relay/0.2.0/hop``
  through :class:`~overlay.relaycore.RelayBook`, then pipes bytes between the
  two streams, accounting each chunk against the circuit's limits.  What it
  carries is the two ends' own Noise session: the relay sees ciphertext only.
- :class:`RelayClient` (every node) accepts ``/libp2p/circuit/relay/0.2.0/stop``
  from relays it holds a reservation with, reserves (:meth:`RelayClient.reserve`)
  and dials through a relay (:meth:`RelayClient.dial`); both ends upgrade the
  relayed stream to an ordinary libp2p connection (Noise + yamux) tagged RELAYED.
- Only a short allow-list of protocols is served over relayed connections
  (:data:`RELAYED_PROTOCOLS`: sealed generation, attestation reports,
  payments, identify, ping, DCUtR); gossip and the DHT never cross a relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .addrs import circuit_addr, ip_class, is_circuit, parse_circuit, strip_peer
from .errors import DialError, NodeError, RemoteProtocolError, TransportError
from .relaycore import Circuit, Refusal, RelayBook, RelayRefused, RelayStats, Status

if TYPE_CHECKING:
    from .host import Overlay

__all__ = [
    "HOP_PROTOCOL",
    "RELAYED_PROTOCOLS",
    "STOP_PROTOCOL",
    "Reservation",
    "RelayClient",
    "RelayHop",
    "is_relayed_conn",
]

log = logging.getLogger(__name__)

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
RELAYED_PROTOCOLS = frozenset(
    {
        "/cocoon/generate/sealed/1",
        "/cocoon/market/report/1",
        "/cocoon/pay/1",
        "/ipfs/id/1.0.0",
        "/ipfs/id/push/1.0.0",
        "/ipfs/ping/1.0.0",
        "/libp2p/dcutr",
    }
)
_MAX_MSG = 4096  # bytes: HOP/STOP control messages are tiny
_CONTROL_TIMEOUT_S = 10.0
_CHUNK = 64 * 1024

Tap = Callable[[Circuit, str, bytes], None]  # (circuit, "src->dst" | "dst->src", bytes relayed)


def is_relayed_conn(conn: object) -> bool:
    """Whether a libp2p connection (a SwarmConn, muxed connection or stream on one) runs over a relay.

    Read from the raw connection at the bottom (py-libp2p's muxer and Noise
    session do not pass the connection type up), so it holds from the moment
    the relayed connection exists, before any stream is negotiated on it.
    """
    from libp2p.connection_types import ConnectionType
    from libp2p.network.connection.raw_connection import RawConnection

    x: object = conn
    for _ in range(8):
        if isinstance(x, RawConnection):
            return x.get_connection_type() == ConnectionType.RELAYED
        nxt = None
        for attr in ("muxed_conn", "secured_conn", "conn"):
            nxt = getattr(x, attr, None)
            if nxt is not None:
                break
        if nxt is None:
            return False
        x = nxt
    return False


async def _read_msg(stream: Any, cls: type[Any]) -> Any:
    from libp2p.utils.varint import read_varint_prefixed_bytes_limited

    with trio.move_on_after(_CONTROL_TIMEOUT_S):
        try:
            data = await read_varint_prefixed_bytes_limited(stream, _MAX_MSG)
        except Exception as e:
            raise RemoteProtocolError(f"bad relay message: {type(e).__name__}: {e}") from e
        msg = cls()
        try:
            msg.ParseFromString(data)
        except Exception as e:
            raise RemoteProtocolError(f"undecodable relay message: {e}") from e
        return msg
    raise RemoteProtocolError(f"no relay message within {_CONTROL_TIMEOUT_S} s")


async def _write_msg(stream: Any, msg: Any) -> None:
    from libp2p.utils.varint import encode_varint_prefixed

    with trio.move_on_after(_CONTROL_TIMEOUT_S):
        try:
            await stream.write(encode_varint_prefixed(msg.SerializeToString()))
        except Exception as e:
            raise TransportError(f"relay write failed: {type(e).__name__}: {e}") from e
        return
    raise TransportError("relay write timed out")


async def _hop_status(stream: Any, status: int, *, reservation: Any = None, limit: Any = None) -> None:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage

    msg = HopMessage(type=HopMessage.STATUS, status=status)  # type: ignore[arg-type]
    if reservation is not None:
        msg.reservation.CopyFrom(reservation)
    if limit is not None:
        msg.limit.CopyFrom(limit)
    await _write_msg(stream, msg)


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception as e:
            log.debug("relay reset: %s", e)


async def _close(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.close()
        except Exception as e:
            log.debug("relay close: %s", e)


def _peer_of(stream: Any) -> str:
    return str(stream.muxed_conn.peer_id)


def _remote_ip(stream: Any) -> str:
    try:
        addr = stream.muxed_conn.get_remote_address()
    except Exception:
        return ""
    return str(addr[0]) if addr else ""


class RelayHop:
    """The relay side (see the module docstring)."""

    def __init__(
        self,
        overlay: Overlay,
        book: RelayBook,
        *,
        policy: Callable[[str], bool] | None = None,
        tap: Tap | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.overlay = overlay
        self.book = book
        self.policy = policy or (lambda peer: True)
        self.tap = tap  # tests: see every byte the relay carries
        self.wall = wall  # the spec's reservation expiry is a Unix time
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_statistics(self, ready: Callable[[RelayStats], bool]) -> RelayStats:
        """Wait until the relay's figures satisfy ``ready`` (bound it with trio.fail_after)."""
        while not ready(st := self.book.statistics()):
            await self._changed.wait()
        return st

    def install(self) -> None:
        self.overlay.set_raw_handler(HOP_PROTOCOL, self._handle)

    def _limit(self) -> Any:
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import Limit

        lim = self.book.limits
        return Limit(duration=int(lim.circuit_duration_s), data=int(lim.circuit_bytes))

    async def _handle(self, stream: Any) -> None:
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage

        peer = _peer_of(stream)
        try:
            if is_relayed_conn(stream):  # spec: no reservations or circuits over relays
                await _hop_status(stream, Status.PERMISSION_DENIED)
                return
            try:
                msg = await _read_msg(stream, HopMessage)
            except RemoteProtocolError as e:
                log.info("relay: %s", e, extra={"peer_id": peer})
                await _hop_status(stream, Status.MALFORMED_MESSAGE)
                return
            if msg.type == HopMessage.RESERVE:
                await self._reserve(stream, peer)
            elif msg.type == HopMessage.CONNECT:
                await self._connect(stream, peer, msg)
                return  # _connect closes or resets the stream itself
            else:
                await _hop_status(stream, Status.UNEXPECTED_MESSAGE)
        except NodeError as e:
            log.info("relay hop from %s: %s", peer, e, extra={"peer_id": peer})
            await _reset(stream)
            return
        await _close(stream)

    async def _reserve(self, stream: Any, peer: str) -> None:
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import Reservation as PbReservation

        now = trio.current_time()
        verdict = self.book.reserve(peer, _remote_ip(stream), now, allowed=self.policy(peer))
        self._notify()
        if isinstance(verdict, Refusal):
            log.info("relay refused a reservation of %s: %s", peer, verdict.reason, extra={"peer_id": peer})
            await _hop_status(stream, verdict.status)
            return
        from multiaddr import Multiaddr

        addrs = [
            Multiaddr(f"{a}/p2p/{self.overlay.peer_id}").to_bytes()
            for a in self.overlay.advertised_addrs()
            if not is_circuit(a)
        ]
        expire = int(self.wall() + (verdict.expires - now))
        res = PbReservation(expire=expire, addrs=addrs)
        await _hop_status(stream, Status.OK, reservation=res, limit=self._limit())
        log.info(
            "relay %s a reservation of %s until +%.0f s",
            "renewed" if verdict.renewed else "granted",
            peer,
            verdict.expires - now,
            extra={"peer_id": peer},
        )

    async def _connect(self, stream: Any, src: str, msg: Any) -> None:
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId, StopMessage

        try:
            dst = str(ID(msg.peer.id))
        except Exception:
            await _hop_status(stream, Status.MALFORMED_MESSAGE)
            await _close(stream)
            return
        opened = self.book.open_circuit(src, dst, trio.current_time())
        self._notify()
        if isinstance(opened, Refusal):
            log.info("relay refused a circuit %s -> %s: %s", src, dst, opened.reason, extra={"peer_id": src})
            await _hop_status(stream, opened.status)
            await _close(stream)
            return
        circuit = opened
        dst_stream: Any = None
        try:
            try:
                if not self.overlay.is_connected(dst):
                    raise TransportError(f"{dst} is not connected to this relay")
                with trio.fail_after(_CONTROL_TIMEOUT_S):
                    dst_stream = await self.overlay.new_raw_stream(dst, STOP_PROTOCOL)
                src_id = PeerId(id=ID.from_base58(src).to_bytes())
                stop = StopMessage(type=StopMessage.CONNECT, peer=src_id, limit=self._limit())
                await _write_msg(dst_stream, stop)
                answer = await _read_msg(dst_stream, StopMessage)
                if answer.type != StopMessage.STATUS or answer.status != Status.OK:
                    raise TransportError(f"{dst} refused the circuit (status {answer.status})")
            except Exception as e:
                log.info("relay could not reach %s for %s: %s", dst, src, e, extra={"peer_id": dst})
                await _hop_status(stream, Status.CONNECTION_FAILED)
                await _close(stream)
                if dst_stream is not None:
                    await _reset(dst_stream)
                return
            await _hop_status(stream, Status.OK, limit=self._limit())
            log.info("relay circuit %d open: %s -> %s", circuit.id, src, dst, extra={"peer_id": src})
            await self._pipe(circuit, stream, dst_stream)
        finally:
            self.book.close_circuit(circuit)
            self._notify()

    async def _pipe(self, circuit: Circuit, a: Any, b: Any) -> None:
        """Copy bytes both ways until one side ends or a limit is passed."""
        async with trio.open_nursery() as n:

            async def copy(src: Any, dst: Any, direction: str) -> None:
                try:
                    while True:
                        try:
                            data = await src.read(_CHUNK)
                        except Exception:
                            data = b""
                        if not data:
                            await _close(dst)
                            return
                        refusal = self.book.account(circuit, len(data), trio.current_time())
                        if refusal is not None:
                            log.info(
                                "relay circuit %d reset: %s", circuit.id, refusal.reason,
                                extra={"peer_id": circuit.src},
                            )  # fmt: skip
                            raise RelayRefused(int(refusal.status), refusal.reason, refusal.detail)
                        if self.tap is not None:
                            self.tap(circuit, direction, data)
                        try:
                            await dst.write(data)
                        except Exception as e:
                            raise TransportError(f"relay write: {e}") from e
                except NodeError:
                    await _reset(a)
                    await _reset(b)
                    n.cancel_scope.cancel()

            n.start_soon(copy, a, b, "src->dst")
            n.start_soon(copy, b, a, "dst->src")


@attrs.frozen
class Reservation:
    relay: str  # peer id
    relay_addrs: tuple[str, ...]  # the relay's transport addresses (no /p2p/)
    expires_unix: float  # when the relay drops it unless renewed
    limit_duration_s: int  # per circuit (0: none)
    limit_bytes: int  # per circuit (0: none)

    def circuit_addrs(self) -> tuple[str, ...]:
        """Our addresses through this relay (what an offer carries; the dialer appends our id)."""
        return tuple(circuit_addr(a, self.relay) for a in self.relay_addrs)


class RelayClient:
    """The relayed side of circuits: STOP handler, reservations, relayed dials (module docstring)."""

    def __init__(self, overlay: Overlay, *, wall: Callable[[], float] = time.time) -> None:
        self.overlay = overlay
        self.wall = wall
        self.reservations: dict[str, Reservation] = {}
        self.accepted = 0  # circuits accepted as destination
        self.dialled = 0  # circuits opened as source
        self.reserved = 0  # reservations granted to us, renewals included
        self._reserved_event = trio.Event()

    async def wait_reserved(self, n: int) -> None:
        """Wait until ``n`` reservations (renewals included) were granted to us (bound it with fail_after)."""
        while self.reserved < n:
            await self._reserved_event.wait()

    def install(self) -> None:
        self.overlay.set_raw_handler(STOP_PROTOCOL, self._handle_stop)

    def circuit_addrs(self) -> tuple[str, ...]:
        now = self.wall()
        out: list[str] = []
        for r in self.reservations.values():
            if r.expires_unix > now:
                out.extend(r.circuit_addrs())
        return tuple(out)

    async def reserve(self, relay: str, addrs: tuple[str, ...] = ()) -> Reservation:
        """Reserve (or renew) a slot on ``relay``; RelayRefused with the relay's reason when refused."""
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
        from multiaddr import Multiaddr

        for a in addrs:
            if not self.overlay.is_connected(relay):
                try:
                    await self.overlay.connect(f"{strip_peer(a)}/p2p/{relay}")
                except DialError as e:
                    log.debug("relay %s at %s: %s", relay, a, e, extra={"peer_id": relay})
        stream = await self.overlay.new_raw_stream(relay, HOP_PROTOCOL)
        try:
            await _write_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await _read_msg(stream, HopMessage)
        except BaseException:
            await _reset(stream)
            raise
        await _close(stream)
        if answer.type != HopMessage.STATUS:
            raise RemoteProtocolError(f"relay {relay} answered RESERVE with message type {answer.type}")
        if answer.status != Status.OK:
            raise _refused(int(answer.status), "reservation")
        relay_addrs: list[str] = []
        for raw in answer.reservation.addrs:
            try:
                s = strip_peer(str(Multiaddr(raw)))
            except Exception:
                continue
            if not is_circuit(s) and s not in relay_addrs:
                relay_addrs.append(s)
        relay_addrs.sort(key=lambda s: {"public": 0, "private": 1}.get(ip_class(s.split("/")[2]), 2))
        if not relay_addrs:
            relay_addrs = [strip_peer(a) for a in addrs]
        r = Reservation(
            relay,
            tuple(relay_addrs[:4]),
            float(answer.reservation.expire),
            int(answer.limit.duration),
            int(answer.limit.data),
        )
        self.reservations[relay] = r
        self.reserved += 1
        self._reserved_event.set()
        self._reserved_event = trio.Event()
        return r

    def drop(self, relay: str) -> None:
        """Stop accepting circuits from ``relay`` (it lapses there at expiry)."""
        self.reservations.pop(relay, None)

    async def _handle_stop(self, stream: Any) -> None:
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import StopMessage
        from multiaddr import Multiaddr

        relay = _peer_of(stream)
        try:
            msg = await _read_msg(stream, StopMessage)
            r = self.reservations.get(relay)
            refuse = None
            if r is None or r.expires_unix <= self.wall():
                refuse = Status.PERMISSION_DENIED  # spec: only circuits from relays we reserved with
            elif msg.type != StopMessage.CONNECT:
                refuse = Status.UNEXPECTED_MESSAGE
            if refuse is not None:
                await _write_msg(stream, StopMessage(type=StopMessage.STATUS, status=refuse))  # type: ignore[arg-type]
                await _close(stream)
                return
            src = ID(msg.peer.id)
            await _write_msg(stream, StopMessage(type=StopMessage.STATUS, status=Status.OK))  # type: ignore[arg-type]
        except Exception as e:
            log.info("relay stop from %s: %s", relay, e, extra={"peer_id": relay})
            await _reset(stream)
            return
        ma = Multiaddr(f"/p2p/{relay}/p2p-circuit/p2p/{src.to_base58()}")
        try:
            await self.overlay.upgrade_relayed(stream, ma, initiator=False, peer=None)
        except NodeError as e:
            log.info("relayed connection from %s failed: %s", src, e, extra={"peer_id": str(src)})
            await _reset(stream)
            return
        self.accepted += 1
        log.info("relayed connection from %s via %s", src, relay, extra={"peer_id": str(src)})

    async def dial(self, addr: str, target: str) -> None:
        """Connect to ``target`` through the relay named in ``addr`` (a circuit address)."""
        from libp2p.peer.id import ID
        from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
        from multiaddr import Multiaddr

        c = parse_circuit(addr)
        if c.target and c.target != target:
            raise DialError(f"{addr} names {c.target}, not {target}")
        try:
            target_id = ID.from_base58(target)
        except Exception as e:
            raise DialError(f"bad peer id {target!r}") from e
        if not self.overlay.is_connected(c.relay_id):
            await self.overlay.connect(f"{c.relay_addr}/p2p/{c.relay_id}")
        stream = await self.overlay.new_raw_stream(c.relay_id, HOP_PROTOCOL)
        try:
            connect = HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=target_id.to_bytes()))
            await _write_msg(stream, connect)
            answer = await _read_msg(stream, HopMessage)
            if answer.type != HopMessage.STATUS:
                raise RemoteProtocolError(f"relay answered CONNECT with message type {answer.type}")
            if answer.status != Status.OK:
                raise _refused(int(answer.status), "circuit")
        except BaseException:
            await _reset(stream)
            raise
        ma = Multiaddr(f"/p2p/{c.relay_id}/p2p-circuit/p2p/{target}")
        try:
            await self.overlay.upgrade_relayed(stream, ma, initiator=True, peer=target)
        except NodeError:
            await _reset(stream)
            raise
        self.dialled += 1
        log.info("connected to %s through relay %s", target, c.relay_id, extra={"peer_id": target})


_REASONS = {
    Status.RESERVATION_REFUSED: "reservation_refused",
    Status.RESOURCE_LIMIT_EXCEEDED: "resource_limit_exceeded",
    Status.PERMISSION_DENIED: "permission_denied",
    Status.CONNECTION_FAILED: "connection_failed",
    Status.NO_RESERVATION: "no_reservation",
    Status.MALFORMED_MESSAGE: "malformed_message",
    Status.UNEXPECTED_MESSAGE: "unexpected_message",
}


def _refused(status: int, what: str) -> RelayRefused:
    try:
        reason = _REASONS[Status(status)]
    except ValueError:
        reason = f"status_{status}"
    return RelayRefused(status, reason, f"the relay refused the {what}")
