"""The libp2p host behind our own narrow interface (the trio shell of the overlay).

:func:`open_overlay` starts a py-libp2p 0.8.1 host configured as
``shared/notes/libp2p.md`` advises and yields an :class:`Overlay`:

- Ed25519 identity; **Noise only** (a plaintext dial is refused, bug B2); yamux;
  TCP; one connection per peer (the 250 ms dial-delay fix, B1); library log
  noise tamed (B11).
- Kademlia DHT on the private protocol ``/cocoon/kad/1.0.0`` (B8), server mode
  for reachable nodes and client mode on request, strict namespaced record
  validators, de-duplicated provider results (B7).
- Bootstrap from a list of multiaddrs with retry and exponential backoff.
- gossipsub v1.1 only, 1 s heartbeat, degree 6/4/12, strict signing, the
  library's spam cap off (B4); our own validators answer ACCEPT / REJECT /
  IGNORE and REJECTs cost the forwarder penalty points (``gossip.py``).
  Subscriptions are drained into a deep buffer and publishes are paced (B3).
- Framed streams (``streams.py``) for request/response and server streaming.
- NAT (``nat.py``): dial-back reachability, circuit relay v2 (relay and
  relayed sides), DCUtR hole punching; ``/p2p-circuit`` addresses dial through
  their relay.  A node listening on ``0.0.0.0`` advertises its interface
  addresses (and ``announce`` ones first).
- Clean shutdown: peers are disconnected before the services stop (B6).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio
import trio.lowlevel
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.pubsub.pubsub import Pubsub
from multiaddr import Multiaddr

from .addrs import expand_unspecified, ip_port, is_circuit, parse_circuit, strip_peer
from .dht import DhtFacade
from .errors import DialError, NodeError, TimeoutError_
from .gossip import PeerPenalties, PublishPacer, Validation
from .identity import Identity
from .nat import ConnInfo, Nat, NatSettings, connection_info, dial_fresh, upgrade_relayed
from .patches import apply_libp2p_fixes
from .streams import FramedStream

__all__ = [
    "GossipMessage",
    "Overlay",
    "OverlaySettings",
    "OverlayStats",
    "StreamHandler",
    "Subscription",
    "open_overlay",
    "split_peer_addr",
]

log = logging.getLogger(__name__)
_M = TypeVar("_M")
StreamHandler = Callable[[FramedStream], Awaitable[None]]
GossipValidator = Callable[[str, bytes], Validation]


@attrs.frozen
class OverlaySettings:
    """How a node joins the overlay.  Units in the comments."""

    listen_host: str = "127.0.0.1"  # IPv4 address to listen on ("0.0.0.0" for all interfaces)
    listen_port: int = 0  # TCP port; 0 picks a free one
    listen: bool = True  # accept inbound connections at all (False: outbound only, reached through relays)
    announce: tuple[str, ...] = ()  # multiaddrs others should dial us at (a forwarded port), first
    bootstrap: tuple[str, ...] = ()  # multiaddrs with /p2p/<peer id>
    dht_mode: str = "server"  # server | client (answers no queries) | auto (server only while reachable)
    gossip: bool = True  # run gossipsub
    heartbeat_s: int = 1  # gossipsub heartbeat, seconds
    degree: int = 6  # gossipsub D
    degree_low: int = 4  # gossipsub D_lo
    degree_high: int = 12  # gossipsub D_hi
    max_frame: int = 1 << 20  # bytes, largest frame on our streams
    dial_timeout_s: float = 10.0  # seconds per dial
    bootstrap_attempts: int = 5  # tries per bootstrap address before giving up for now
    bootstrap_backoff_s: float = 0.25  # first retry delay, doubled each try (capped at 30 s)
    publish_rate: float = 200.0  # our publishes per second (token bucket)
    publish_burst: int = 16  # publishes allowed back to back
    ban_after: int = 20  # REJECT points before a forwarder is blacklisted
    subscription_buffer: int = 4096  # messages held per subscription before dropping
    low_watermark: int = 8  # connections: py-libp2p dials known peers when below (low+high)/2 ...
    high_watermark: int = 24  # ... (its defaults, 100/300, make every node dial every peer it knows)
    nat: NatSettings = attrs.field(factory=NatSettings)  # reachability, relay, hole punching


@attrs.frozen
class GossipMessage:
    topic: str
    origin: str  # peer id of the publisher (signed by it: strict signing)
    data: bytes
    seqno: bytes


@attrs.frozen
class OverlayStats:
    peer_id: str
    connected_peers: int
    routing_table_size: int
    topics: tuple[str, ...]
    published: int
    received: int
    rejected: int
    ignored: int
    dropped: int


def split_peer_addr(addr: str) -> tuple[str, str]:
    """``/ip4/../tcp/../p2p/<id>`` -> (transport multiaddr, peer id); DialError if no /p2p/."""
    marker = "/p2p/"
    i = addr.rfind(marker)
    if i < 0 or not addr[i + len(marker) :]:
        raise DialError(f"address {addr!r} has no /p2p/<peer id> part")
    return addr[:i], addr[i + len(marker) :]


class _PeerNotifee(INotifee):
    """Calls back when a connection opens or closes (so waits need no polling)."""

    def __init__(self, changed: Callable[[], None], streams: Callable[[], None]) -> None:
        self._changed = changed
        self._streams = streams

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        self._streams()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._changed()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._changed()

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


class Subscription:
    """Messages of one topic that passed validation (an async iterator)."""

    def __init__(self, topic: str, recv: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        self.topic = topic
        self._recv = recv

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> GossipMessage:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def get(self) -> GossipMessage:
        return await self._recv.receive()


class Overlay:
    """One node's view of the overlay.  Create with :func:`open_overlay`."""

    def __init__(self, identity: Identity, settings: OverlaySettings) -> None:
        from libp2p import new_host
        from libp2p.crypto.keys import KeyPair
        from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
        from libp2p.custom_types import TProtocol
        from libp2p.network.config import ConnectionConfig
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
        from libp2p.security.noise.transport import Transport as NoiseTransport
        from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
        from libp2p.stream_muxer.yamux.yamux import Yamux

        self.identity = identity
        self.settings = settings
        self.peer_id = identity.peer_id
        kp = identity.libp2p_keypair()
        assert isinstance(kp, KeyPair)
        if settings.dht_mode not in ("server", "client", "auto"):
            raise NodeError(f"dht_mode must be server, client or auto, not {settings.dht_mode!r}")
        self._host = new_host(
            key_pair=kp,
            sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=x25519_pair().private_key)},
            muxer_opt={TProtocol(YAMUX_ID): Yamux},
            connection_config=ConnectionConfig(
                max_connections_per_peer=1,
                min_connections=min(4, settings.low_watermark),
                low_watermark=settings.low_watermark,
                high_watermark=settings.high_watermark,
                max_connections=max(settings.high_watermark * 4, 64),
            ),
            addrs_factory=self._identify_addrs,
        )
        self._nursery: trio.Nursery | None = None
        self._dht: DhtFacade | None = None
        self._pubsub: object | None = None
        self._penalties = PeerPenalties(ban_after=settings.ban_after)
        self._pacer = PublishPacer(settings.publish_rate, settings.publish_burst, 0.0)
        self._subs: dict[str, Subscription] = {}
        self._counts = {"published": 0, "received": 0, "rejected": 0, "ignored": 0, "dropped": 0}
        self._peers_changed = trio.Event()
        self._topics_changed = trio.Event()
        self._counts_changed: trio.Event | None = None  # made only while someone waits
        self._streams_changed = trio.Event()
        self._host.get_network().register_notifee(
            _PeerNotifee(self._on_peers_changed, self._on_stream_change)
        )
        self.nat = Nat(self, settings.nat)

    # ------------------------------------------------------------------ addresses and peers

    def listen_addrs(self) -> list[str]:
        """Our listen multiaddrs (``0.0.0.0`` expanded per interface), each ending in /p2p/<our id>."""
        raw = [strip_peer(str(a)) for a in self._host.get_transport_addrs()]
        return [f"{a}/p2p/{self.peer_id}" for a in expand_unspecified(raw)]

    def advertised_addrs(self) -> list[str]:
        """What others should dial us at, best first, without /p2p/: announce, confirmed public, listen."""
        confirmed = self.nat.reach.core.public_addrs(trio.current_time())
        listen = [strip_peer(a) for a in self.listen_addrs()]
        if any(not a.startswith("/ip4/127.") for a in listen):
            listen = [a for a in listen if not a.startswith("/ip4/127.")] + [
                a for a in listen if a.startswith("/ip4/127.")
            ]
        return list(dict.fromkeys([*map(strip_peer, self.settings.announce), *confirmed, *listen]))

    def _identify_addrs(self, candidates: list[object]) -> list[object]:
        """The addresses identify and our peer record carry (py-libp2p's addrs_factory hook)."""
        from multiaddr import Multiaddr

        if "nat" not in self.__dict__:  # py-libp2p asks while the host is being built
            return candidates
        out: list[object] = []
        for a in self.advertised_addrs():
            try:
                out.append(Multiaddr(a))
            except Exception as e:
                log.debug("unusable address %s: %s", a, e)
        return out or candidates

    @property
    def libp2p_host(self) -> Any:
        """The py-libp2p host (for the NAT services; nothing else should need it)."""
        return self._host

    def is_connected(self, peer_id: str) -> bool:
        return any(str(p) == peer_id for p in self._host.get_connected_peers())

    def connections_of(self, peer_id: str) -> list[Any]:
        """The live libp2p connections to ``peer_id`` (SwarmConn objects)."""
        from libp2p.peer.id import ID

        try:
            conns = self._host.get_network().get_connections(ID.from_base58(peer_id))
        except Exception:
            return []
        return list(conns)

    def superseded(self, stream: FramedStream) -> bool:
        """Whether ``stream`` runs over a relay while a direct connection to its peer exists (open anew)."""
        from .relay import is_relayed_conn

        if not is_relayed_conn(stream.raw):
            return False
        return any(not is_relayed_conn(c) for c in self.connections_of(stream.peer_id))

    def speaks(self, peer_id: str, protocol: str) -> bool:
        """Whether ``peer_id`` announced ``protocol`` (identify)."""
        from libp2p.peer.id import ID

        try:
            return protocol in self._host.get_peerstore().get_protocols(ID.from_base58(peer_id))
        except Exception:
            return False

    def connection_info(self, stream: FramedStream) -> ConnInfo | None:
        return connection_info(stream.raw)

    async def dial_fresh(self, addr: str, peer_id: str) -> None:
        await dial_fresh(self._host, addr, peer_id)

    async def upgrade_relayed(
        self, stream: object, ma: object, *, initiator: bool, peer: str | None
    ) -> object:
        muxed = await upgrade_relayed(self._host, stream, ma, initiator=initiator, peer=peer)
        self._on_peers_changed()
        return muxed

    def dialback_candidates(self) -> tuple[str, ...]:
        return tuple(a for a in self.advertised_addrs() if ip_port(a) is not None)

    def reachability_changed(self, status: str) -> None:
        """A new reachability verdict: the DHT mode follows it (``dht_mode = "auto"``)."""
        if self.settings.dht_mode == "auto" and self._dht is not None and self._nursery is not None:
            self._nursery.start_soon(self._dht.set_server, status == "public")

    async def wait_stream_change(self) -> None:
        """Return after the next stream on any connection closes."""
        await self._streams_changed.wait()

    def _on_stream_change(self) -> None:
        self._streams_changed.set()
        self._streams_changed = trio.Event()

    def connected_peers(self) -> list[str]:
        return sorted(str(p) for p in self._host.get_connected_peers())

    async def wait_peers(self, n: int) -> None:
        """Wait until at least ``n`` peers are connected (bound it with trio.fail_after)."""
        while len(self._host.get_connected_peers()) < n:
            await self._peers_changed.wait()

    def _on_peers_changed(self) -> None:
        self._peers_changed.set()
        self._peers_changed = trio.Event()

    async def connect(self, addr: str) -> str:
        """Dial ``addr`` (with /p2p/<id>) and return the peer id; DialError on any failure."""
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo
        from multiaddr import Multiaddr

        if is_circuit(addr):
            return await self._connect_relayed(addr)
        transport, pid = split_peer_addr(addr)
        try:
            info = PeerInfo(ID.from_base58(pid), [Multiaddr(transport)])
        except Exception as e:
            raise DialError(f"bad address {addr!r}: {e}") from e
        if pid == self.peer_id:
            return pid
        with trio.move_on_after(self.settings.dial_timeout_s):
            try:
                await self._host.connect(info)
            except NodeError:
                raise
            except Exception as e:
                raise DialError(f"cannot reach {addr}: {type(e).__name__}: {e}") from e
            if self._dht is not None:
                await self._dht.add_peer(pid)
            return pid
        raise DialError(f"no answer from {addr} within {self.settings.dial_timeout_s} s")

    async def _connect_relayed(self, addr: str) -> str:
        """Dial ``<relay>/p2p-circuit/p2p/<target>``; a hole punch toward the target follows."""
        c = parse_circuit(addr)
        if not c.target:
            raise DialError(f"{addr}: a circuit address to dial must end in /p2p/<peer id>")
        if self.is_connected(c.target):
            return c.target
        with trio.move_on_after(self.settings.dial_timeout_s * 2):
            await self.nat.client.dial(addr, c.target)
            self.nat.punch.punch_soon(c.target)
            return c.target
        limit = self.settings.dial_timeout_s * 2
        raise DialError(f"no answer through {c.relay_id} from {c.target} within {limit} s")

    async def disconnect(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        with trio.move_on_after(2):
            try:
                await self._host.disconnect(ID.from_base58(peer_id))
            except Exception as e:
                log.debug("disconnect %s: %s", peer_id, e, extra={"peer_id": peer_id})

    async def bootstrap(self, addrs: tuple[str, ...] | None = None) -> int:
        """Connect to the bootstrap peers (retrying with backoff); returns how many answered."""
        targets = [a for a in (self.settings.bootstrap if addrs is None else addrs) if self.peer_id not in a]
        if not targets:
            return 0
        ok = 0

        async def one(addr: str) -> None:
            nonlocal ok
            delay = self.settings.bootstrap_backoff_s
            for attempt in range(1, self.settings.bootstrap_attempts + 1):
                try:
                    await self.connect(addr)
                    ok += 1
                    return
                except DialError as e:
                    log.warning(
                        "bootstrap %s failed (try %d/%d): %s",
                        addr,
                        attempt,
                        self.settings.bootstrap_attempts,
                        e,
                        extra={"peer_id": self.peer_id},
                    )
                if attempt < self.settings.bootstrap_attempts:
                    await trio.sleep(delay)
                    delay = min(delay * 2, 30.0)

        async with trio.open_nursery() as n:
            for a in targets:
                n.start_soon(one, a)
        if ok and self._dht is not None:
            await self._dht.refresh()
        if not ok:
            log.error(
                "no bootstrap peer answered (%s); check the network's bootstrap.toml entry "
                "or pass --bootstrap <multiaddr>",
                ", ".join(targets),
                extra={"peer_id": self.peer_id},
            )
        return ok

    # ------------------------------------------------------------------ streams

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``: ``handler`` gets a FramedStream; errors never escape to libp2p."""
        from libp2p.custom_types import TProtocol

        async def wrapped(stream: object) -> None:
            peer = str(stream.muxed_conn.peer_id)  # type: ignore[attr-defined]
            fs = FramedStream(stream, max_frame=self.settings.max_frame, peer_id=peer)  # type: ignore[arg-type]
            try:
                await handler(fs)
            except NodeError as e:
                log.info("%s handler: %s", protocol, e, extra={"peer_id": peer})
                await fs.reset()
            except Exception:
                log.exception("%s handler crashed", protocol, extra={"peer_id": peer})
                await fs.reset()
            else:
                await fs.aclose()

        self._host.set_stream_handler(TProtocol(protocol), wrapped)

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: tuple[str, ...] = ()) -> FramedStream:
        """A new stream to ``peer_id`` speaking ``protocol`` (dials first if needed)."""
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        if addrs and not self.is_connected(peer_id):
            await self._connect_any(peer_id, addrs)
        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:
            raise DialError(f"bad peer id {peer_id!r}") from e
        with trio.move_on_after(self.settings.dial_timeout_s):
            try:
                raw = await self._host.new_stream(pid, [TProtocol(protocol)])
            except Exception as e:
                raise DialError(f"cannot open {protocol} to {peer_id}: {type(e).__name__}: {e}") from e
            return FramedStream(raw, max_frame=self.settings.max_frame, peer_id=peer_id)
        raise DialError(f"opening {protocol} to {peer_id} timed out")

    async def _connect_any(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        """Connect to ``peer_id`` at the first of ``addrs`` that answers (direct ones before relays)."""
        ordered = sorted(addrs, key=is_circuit)
        errors = []
        for a in ordered:
            full = a if a.endswith(f"/p2p/{peer_id}") else f"{a}/p2p/{peer_id}"
            try:
                await self.connect(full)
                return
            except DialError as e:
                errors.append(str(e))
        raise DialError(f"cannot reach {peer_id}: " + "; ".join(errors[-3:]))

    def set_raw_handler(self, protocol: str, handler: Callable[[object], Awaitable[None]]) -> None:
        """Serve ``protocol`` with a handler of raw libp2p streams (errors are logged, never escape)."""
        from libp2p.custom_types import TProtocol

        async def wrapped(stream: object) -> None:
            try:
                await handler(stream)
            except Exception:
                log.exception("%s handler crashed", protocol)
                with trio.move_on_after(2):
                    try:
                        await stream.reset()  # type: ignore[attr-defined]
                    except Exception as e:
                        log.debug("reset: %s", e)

        self._host.set_stream_handler(TProtocol(protocol), wrapped)

    async def new_raw_stream(self, peer_id: str, protocol: str) -> object:
        """A raw libp2p stream to a connected (or dialable) peer; DialError when it cannot be opened."""
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        try:
            pid = ID.from_base58(peer_id)
        except Exception as e:
            raise DialError(f"bad peer id {peer_id!r}") from e
        with trio.move_on_after(self.settings.dial_timeout_s):
            try:
                return await self._host.new_stream(pid, [TProtocol(protocol)])
            except Exception as e:
                raise DialError(f"cannot open {protocol} to {peer_id}: {type(e).__name__}: {e}") from e
        raise DialError(f"opening {protocol} to {peer_id} timed out")

    async def request(
        self, peer_id: str, protocol: str, msg: object, response: type[_M], timeout: float = 10.0
    ) -> _M:
        """One request, one typed response, on a fresh stream; bounded by ``timeout``."""
        with trio.move_on_after(timeout):
            stream = await self.open_stream(peer_id, protocol)
            try:
                return await stream.request(msg, response, timeout)
            finally:
                await stream.aclose()
        raise TimeoutError_(f"{protocol} request to {peer_id} timed out after {timeout} s")

    # ------------------------------------------------------------------ DHT

    @property
    def dht(self) -> DhtFacade:
        if self._dht is None:
            raise NodeError("the DHT is not running")
        return self._dht

    # ------------------------------------------------------------------ gossip

    async def subscribe(self, topic: str, validator: GossipValidator | None = None) -> Subscription:
        """Join ``topic``; messages that ``validator`` ACCEPTs arrive on the subscription."""
        if topic in self._subs:
            return self._subs[topic]
        ps = self._require_pubsub()
        if validator is not None:
            ps.set_topic_validator(topic, self._wrap_validator(topic, validator), False)  # type: ignore[attr-defined]
        raw = await ps.subscribe(topic)  # type: ignore[attr-defined]
        send, recv = trio.open_memory_channel[GossipMessage](self.settings.subscription_buffer)
        sub = Subscription(topic, recv)
        self._subs[topic] = sub
        assert self._nursery is not None
        self._nursery.start_soon(self._pump, topic, raw, send)
        return sub

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic`` (paced; see the module docstring)."""
        ps = self._require_pubsub()
        delay = self._pacer.delay(trio.current_time())
        if delay > 0:
            await trio.sleep(delay)
        await ps.publish(topic, data)  # type: ignore[attr-defined]
        self._counts["published"] += 1
        await trio.lowlevel.checkpoint()  # py-libp2p's publish never yields (B3)

    def gossip_peers(self, topic: str) -> list[str]:
        """Peers we know to be subscribed to ``topic``."""
        ps = self._require_pubsub()
        peers = ps.peer_topics.get(topic, set())  # type: ignore[attr-defined]
        return sorted(str(p) for p in peers)

    async def wait_topic_peers(self, topic: str, n: int) -> None:
        """Wait until ``n`` peers announced ``topic`` to us (bound it with trio.fail_after)."""
        while len(self.gossip_peers(topic)) < n:
            await self._topics_changed.wait()

    def _hook_subscriptions(self, pubsub: Pubsub) -> None:
        original = pubsub.handle_subscription

        def handle(*args: object, **kwargs: object) -> None:
            original(*args, **kwargs)  # type: ignore[arg-type]
            self._topics_changed.set()
            self._topics_changed = trio.Event()

        pubsub.handle_subscription = handle  # type: ignore[method-assign]

    def penalty(self, peer_id: str) -> float:
        return self._penalties.score(peer_id, trio.current_time())

    def _require_pubsub(self) -> object:
        if self._pubsub is None:
            raise NodeError("gossip is not enabled on this node")
        return self._pubsub

    def _wrap_validator(self, topic: str, validator: GossipValidator) -> Callable[[object, object], bool]:
        from libp2p.peer.id import ID

        def check(forwarder: object, msg: object) -> bool:
            origin = str(ID(msg.from_id))  # type: ignore[attr-defined]
            try:
                verdict = validator(origin, bytes(msg.data))  # type: ignore[attr-defined]
            except Exception:
                log.exception("validator of %s crashed; rejecting", topic)
                verdict = Validation.REJECT
            if verdict is Validation.ACCEPT:
                return True
            self._counted()
            fwd = str(forwarder)
            if verdict is Validation.REJECT:
                self._counts["rejected"] += 1
                if fwd != self.peer_id and self._penalties.penalise(fwd, trio.current_time()):
                    log.warning("blacklisting %s: too many invalid messages", fwd, extra={"peer_id": fwd})
                    self._pubsub.add_to_blacklist(forwarder)  # type: ignore[union-attr]
            else:
                self._counts["ignored"] += 1
            return False

        return check

    async def _pump(self, topic: str, raw: object, send: trio.MemorySendChannel[GossipMessage]) -> None:
        from libp2p.peer.id import ID

        async with send:
            while True:
                try:
                    msg = await raw.get()  # type: ignore[attr-defined]
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                gm = GossipMessage(topic, str(ID(msg.from_id)), bytes(msg.data), bytes(msg.seqno))
                self._counts["received"] += 1
                self._counted()
                try:
                    send.send_nowait(gm)
                except trio.WouldBlock:
                    self._counts["dropped"] += 1
                    log.warning("subscription %s is not drained; dropping a message", topic)

    # ------------------------------------------------------------------ misc

    def _counted(self) -> None:
        if self._counts_changed is not None:
            self._counts_changed.set()
            self._counts_changed = None

    async def wait_statistics(self, ready: Callable[[OverlayStats], bool]) -> OverlayStats:
        """Wait until the gossip counters satisfy ``ready`` (bound it with trio.fail_after)."""
        while not ready(st := self.statistics()):
            if self._counts_changed is None:
                self._counts_changed = trio.Event()
            await self._counts_changed.wait()
        return st

    def statistics(self) -> OverlayStats:
        return OverlayStats(
            peer_id=self.peer_id,
            connected_peers=len(self._host.get_connected_peers()),
            routing_table_size=self._dht.routing_table_size() if self._dht else 0,
            topics=tuple(sorted(self._subs)),
            **self._counts,
        )

    async def _shutdown(self) -> None:
        """Disconnect every peer before the services stop (B6)."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as n:
                for p in list(self._host.get_connected_peers()):
                    n.start_soon(self.disconnect, str(p))
            await trio.sleep(0.05)


def _tame_library_logs() -> None:
    if not os.environ.get("LIBP2P_DEBUG"):
        for name in ("libp2p", "multiaddr", "async_service"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


@asynccontextmanager
async def open_overlay(identity: Identity, settings: OverlaySettings | None = None) -> AsyncIterator[Overlay]:
    """Start a host, its DHT and gossip; bootstrap; yield the :class:`Overlay`; shut down cleanly."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.tools.anyio_service import background_trio_service
    from multiaddr import Multiaddr

    settings = settings or OverlaySettings()
    apply_libp2p_fixes()
    _tame_library_logs()
    ov = Overlay(identity, settings)
    listen = Multiaddr(f"/ip4/{settings.listen_host}/tcp/{settings.listen_port}")
    body_error: BaseException | None = None
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(ov._host.run([listen] if settings.listen else []))
            ov._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(ov._nursery.cancel_scope.cancel)
            ov.nat.install(ov._host)
            server = settings.dht_mode == "server" or (
                settings.dht_mode == "auto" and settings.nat.reachability == "public"
            )
            ov._dht = DhtFacade(ov._host, server=server, peer_id=ov.peer_id)
            await stack.enter_async_context(background_trio_service(ov._dht.kad))
            dcutr = ov.nat.punch.make_service()
            if dcutr is not None:
                await stack.enter_async_context(background_trio_service(dcutr))
            ov.nat.punch.bind(ov._nursery)
            if settings.gossip:
                router = GossipSub(
                    protocols=[PROTOCOL_ID_V11],
                    degree=settings.degree,
                    degree_low=settings.degree_low,
                    degree_high=settings.degree_high,
                    heartbeat_interval=settings.heartbeat_s,
                    spam_protection_enabled=False,
                    adaptive_gossip_enabled=False,
                )
                pubsub = Pubsub(ov._host, router, strict_signing=True)
                ov._pubsub = pubsub
                ov._hook_subscriptions(pubsub)
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(router))
                with trio.fail_after(10):
                    await pubsub.wait_until_ready()
            stack.push_async_callback(ov._shutdown)
            log.info(
                "overlay up at %s (dht %s)",
                ", ".join(ov.listen_addrs()),
                settings.dht_mode,
                extra={"peer_id": ov.peer_id},
            )
            if settings.bootstrap:
                await ov.bootstrap()
            await ov._nursery.start(ov.nat.run)
            try:
                yield ov
            except BaseException as e:  # shut down as usual, then re-raise it as it was
                body_error = e
    except BaseException as teardown:
        # py-libp2p's services can raise while they stop (trio assertions, closed nurseries,
        # Cancelled from their own scopes).  An error of the body wins; otherwise say so.
        if body_error is None and not _teardown_noise(teardown):
            raise
        log.debug("overlay teardown: %r", teardown, extra={"peer_id": ov.peer_id})
    if body_error is not None:
        raise body_error


def _teardown_noise(exc: BaseException) -> bool:
    """Errors py-libp2p 0.8.1 raises while its services stop (nothing of ours)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_teardown_noise(e) for e in exc.exceptions)
    if isinstance(exc, trio.Cancelled | AssertionError):
        return True
    return isinstance(exc, RuntimeError) and "closed" in str(exc).lower()
