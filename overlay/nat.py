"""Getting through NAT: reachability, the relay (both sides) and hole punching, wired to one host.

:class:`Nat` is the overlay's part that answers "can others dial me, and if
not, how do they reach me?":

- :class:`~overlay.reach.DialBackService` asks connected servers (nodes that
  speak ``/cocoon/dialback/1``) to dial us back, on joining and every
  ``probe_every_s``; with ``dht_mode = "auto"`` the DHT runs in server mode only
  while the status is ``public``;
- :class:`~overlay.relay.RelayHop` when this node relays (``relay_hop``: elected
  proxies and bootstrap nodes), with the policy its role gives;
- :class:`~overlay.relay.RelayClient` on every node (STOP, reserve, relayed dials);
- :class:`~overlay.holepunch.HolePuncher` after each relayed dial.

The functions at the bottom are the few places that reach into py-libp2p's
host internals (a fresh dial for a dial-back, upgrading a relayed stream to a
connection, connection endpoints); everything else goes through them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .errors import DialError, NodeError
from .holepunch import HolePuncher, install_relayed_filter
from .reach import DIALBACK_PROTOCOL, DialBackService, Reachability
from .relay import RelayClient, RelayHop, is_relayed_conn
from .relaycore import RelayBook, RelayLimits

if TYPE_CHECKING:
    from .host import Overlay

__all__ = ["ConnInfo", "Nat", "NatSettings", "connection_info", "dial_fresh", "upgrade_relayed"]

log = logging.getLogger(__name__)


@attrs.frozen
class NatSettings:
    """How a node finds out whether it is reachable and how it helps others.  Units in the comments."""

    reachability: str = "auto"  # auto (measure with dial-backs) | public | private (forced)
    dialback_server: bool = True  # answer other nodes' dial-back requests
    dialback_need: int = 2  # servers that must agree before the status flips
    probe_every_s: float = 600.0  # s between dial-back rounds
    relay_hop: bool = False  # relay circuits for peers that reserve here (proxies, bootstrap)
    relay_limits: RelayLimits = attrs.field(factory=RelayLimits)
    holepunch: bool = True  # try DCUtR after each relayed dial


@attrs.frozen
class ConnInfo:
    remote_ip: str
    local_ip: str
    relayed: bool


class Nat:
    """The NAT services of one overlay (see the module docstring)."""

    def __init__(self, overlay: Overlay, settings: NatSettings) -> None:
        self.overlay = overlay
        self.settings = settings
        forced = settings.reachability if overlay.settings.listen else "private"  # nobody can dial in
        self.reach = DialBackService(overlay, Reachability(need=settings.dialback_need, forced=forced))
        self.client = RelayClient(overlay)
        self.book = RelayBook(settings.relay_limits)
        self.hop: RelayHop | None = RelayHop(overlay, self.book) if settings.relay_hop else None
        self.punch = HolePuncher(overlay, enabled=settings.holepunch)
        self._probe_now = trio.Event()

    def install(self, host: Any) -> None:
        install_relayed_filter(host)
        self.client.install()
        if self.hop is not None:
            self.hop.install()
        if self.settings.dialback_server:
            self.overlay.set_stream_handler(DIALBACK_PROTOCOL, self.reach.serve)

    def status(self) -> str:
        return self.reach.status()

    def probe_soon(self) -> None:
        self._probe_now.set()

    def servers(self) -> list[str]:
        """Peers to ask for dial-backs: directly connected, those known to answer them first.

        Right after joining, identify may not have told us yet what a peer speaks;
        asking a peer that does not answer dial-backs only costs a refused stream.
        """
        direct = [
            p
            for p in self.overlay.connected_peers()
            if any(not is_relayed_conn(c) for c in self.overlay.connections_of(p))
        ]
        return sorted(direct, key=lambda p: not self.overlay.speaks(p, DIALBACK_PROTOCOL))

    async def probe(self) -> str:
        servers = self.servers()
        if not servers:
            return self.status()
        status = await self.reach.probe(servers[:5])
        self.overlay.reachability_changed(status)
        return status

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial-back rounds (when measuring) and relay upkeep, until cancelled."""
        task_status.started()
        while True:
            if self.reach.core.forced == "auto":
                try:
                    await self.probe()
                except NodeError as e:
                    log.info("reachability probe: %s", e)
            self.book.expire(trio.current_time())
            wait = self.settings.probe_every_s
            if self.reach.core.forced == "auto" and self.status() == "unknown":
                wait = min(wait, 5.0)  # no verdict yet: ask again soon (servers may not be connected)
            with trio.move_on_after(wait):
                await self._probe_now.wait()
            self._probe_now = trio.Event()

    def _relayed_count(self) -> int:
        peers = self.overlay.connected_peers()
        conns = [c for p in peers for c in self.overlay.connections_of(p)]
        return sum(1 for c in conns if is_relayed_conn(c))

    def status_section(self) -> dict[str, object]:
        now = trio.current_time()
        r = self.reach.core.statistics(now)
        section: dict[str, object] = {
            "reachability": r.status + (" (configured)" if r.forced else ""),
            "public_addrs": list(r.public_addrs),
            "dialback_verdicts": len(r.verdicts),
            "reservations": sorted(self.client.reservations),
            "circuit_addrs": list(self.client.circuit_addrs()),
            "relayed_connections": self._relayed_count(),
        }
        p = self.punch.statistics()
        section["hole_punches"] = f"{p.direct} direct / {p.attempts} tried"
        if self.hop is not None:
            st = self.book.statistics()
            section["relay"] = {
                "reservations": st.reservations,
                "circuits": st.circuits,
                "circuits_opened": st.circuits_opened,
                "bytes_relayed": st.bytes_relayed,
                "refused": st.refused,
            }
        return section


# --------------------------------------------------------------------------- py-libp2p glue


def _socket_of(muxed_conn: Any) -> Any:
    """The TCP socket under a (direct) libp2p connection, or None.

    yamux -> secure session -> noise read-writer -> raw connection -> TrioTCPStream -> SocketStream.
    """
    x = getattr(muxed_conn, "secured_conn", None)
    for _ in range(8):
        sock = getattr(x, "socket", None)
        if sock is not None:
            return sock
        x = getattr(x, "conn", None) or getattr(x, "stream", None)
        if x is None:
            return None
    return None


def connection_info(stream: Any) -> ConnInfo | None:
    """Endpoints of the connection a raw libp2p stream runs on."""
    conn = getattr(stream, "muxed_conn", None)
    if conn is None:
        return None
    relayed = is_relayed_conn(conn)
    remote = ""
    try:
        addr = conn.get_remote_address()
        remote = str(addr[0]) if addr else ""
    except Exception:
        remote = ""
    local = ""
    sock = _socket_of(conn)
    if sock is not None:
        try:
            local = str(sock.getsockname()[0])
        except OSError:
            local = ""
    return ConnInfo(remote, local, relayed)


async def dial_fresh(host: Any, addr: str, peer_id: str) -> None:
    """A new TCP connection to ``addr`` from an ephemeral port, Noise-authenticated as ``peer_id``, closed.

    Never reuses (nor registers) a connection: ``host.connect`` would return the
    connection a dial-back request arrived on.
    """
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    try:
        pid = ID.from_base58(peer_id)
        maddr = Multiaddr(f"{addr}/p2p/{peer_id}")
    except Exception as e:
        raise DialError(f"bad dial-back target {addr} {peer_id}: {e}") from e
    swarm = host.get_network()
    transport = swarm.transport_manager.transport_for_dialing(maddr)
    if transport is None:
        raise DialError(f"no transport dials {addr}")
    try:
        raw = await transport.dial(maddr)
    except Exception as e:
        raise DialError(f"dial-back to {addr} failed: {type(e).__name__}: {e}") from e
    try:
        secured = await swarm.upgrader.upgrade_security(raw, True, pid)
    except Exception as e:
        raise DialError(f"dial-back to {addr}: not {peer_id} ({type(e).__name__}: {e})") from e
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await raw.close()
            except Exception as e:
                log.debug("dial-back close: %s", e)
    del secured


async def upgrade_relayed(host: Any, stream: Any, ma: Any, *, initiator: bool, peer: str | None) -> Any:
    """Turn a relayed stream into a libp2p connection (Noise + yamux inside), tagged RELAYED."""
    from libp2p.connection_types import ConnectionType
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.peer.id import ID

    raw = RawConnection(
        stream=stream, initiator=initiator, connection_type=ConnectionType.RELAYED, addresses=[ma]
    )
    try:
        with trio.fail_after(15):
            if initiator:
                assert peer is not None
                conn = await host.upgrade_outbound_connection(raw, ID.from_base58(peer))
                muxed = conn.muxed_conn
            else:
                muxed = await host.upgrade_inbound_connection(raw, ma)
    except trio.TooSlowError as e:
        raise DialError("upgrading the relayed connection timed out") from e
    except NodeError:
        raise
    except Exception as e:
        raise DialError(f"upgrading the relayed connection failed: {type(e).__name__}: {e}") from e
    for c in host.get_network().get_connections(muxed.peer_id):
        if getattr(c, "muxed_conn", None) is muxed:
            c.set_transport_info([ma], ConnectionType.RELAYED)
    return muxed
