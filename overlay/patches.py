"""Workarounds for py-libp2p 0.8.1 bugs, applied once before any host is built.

Each one is named after its entry in ``shared/notes/libp2p.md``:

- B8: Kademlia ignores ``protocol_prefix``; we rewrite the module constants to
  ``/cocoon/kad/1.0.0`` so our DHT never mixes with the public IPFS one.
- B14: yamux sends a WINDOW_UPDATE after nearly every read (one extra encrypted
  frame per message each way); ``PY_YAMUX_RELEASE_ON_READ=0`` restores
  go-yamux's half-window hysteresis.
- Signed peer records: gossipsub attaches the sender's signed peer record to
  every RPC and the receiver verifies its Ed25519 signature every time.  The
  record only changes when the sender's addresses do, so a verified
  (peer, record) pair is remembered for 10 minutes; and the sender's own
  record (rebuilt from the listen sockets and re-serialised on every RPC) is
  kept for 10 seconds.
- yamux reads its ``PY_YAMUX_*`` tuning variables from the environment on
  every read; they are read once.
- pubsub reads each RPC's length prefix one byte per ``read`` call (each a trip
  through noise and yamux); its streams are read through a per-stream buffer
  instead (only pubsub's reader touches those streams).
- Our own publishes with a thin mesh: gossipsub sends a message only to its mesh
  peers for a subscribed topic, and the mesh is empty until a heartbeat grafts
  (and thin after churn), so a message published right after joining went to
  nobody and IHAVE gossip never repaired it (the peer joined the mesh later).
  Like go-libp2p's flood publishing, but bounded: our own messages also go to
  other known topic peers until D peers get them.
- Task spawning: pubsub spawns a task per received message copy, and the
  service manager finds the spawning task's parent by walking its whole task
  tree (O(tasks) per message). The parent of a trio task never changes, so it
  is remembered per manager.
- yamux window updates: besides B14, a "partial slack" branch sends a
  WINDOW_UPDATE after every read that leaves the window short by less than the
  threshold, which is every small read. Replaced by go-yamux's rule: grant
  what was consumed once it reaches half the window (auto-tuning kept).
- Cancelled writes killed the connection: noise encrypts a message (its nonce
  counter moves on), then awaits the socket write, which is a cancel point. A
  task cancelled right there (a payment sender stopped at the end of a session,
  any ``move_on_after`` around a send) dropped the ciphertext after using its
  nonce; the peer could decrypt nothing after it and tore the connection down,
  with every stream on it (``StreamBroken ... StreamError`` on the next write).
  A noise message is now written whole or not at all: cancellation is checked
  before encrypting and the write itself is shielded, for at most
  ``NOISE_WRITE_TIMEOUT_S`` (yamux's own limit on reading a frame body); a
  write that takes longer closes the connection, which is broken by then.
- Relay legs: with one connection per peer, a hole-punched connection next to
  a relayed one makes the swarm trim the connection with fewer streams once the
  older is past its grace period, which can be the relayed one carrying a
  generation.  The swarm leaves such pairs alone; ``holepunch.HolePuncher``
  closes the relay leg once it carries no stream.
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

__all__ = ["KAD_PROTOCOL", "NOISE_WRITE_TIMEOUT_S", "apply_libp2p_fixes"]

KAD_PROTOCOL = "/cocoon/kad/1.0.0"
NOISE_WRITE_TIMEOUT_S = 60.0  # seconds one shielded noise write may take before the connection is closed
_RECORD_CACHE_SIZE = 4096
_RECORD_CACHE_TTL_S = 600.0
_OWN_RECORD_TTL_S = 10.0
_applied = False
_MISSING = object()


def _cached_record_consumer(original: Callable[..., bool]) -> Callable[..., bool]:
    cache: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()

    def consume(msg: object, host: object, peer_id: object) -> bool:
        if not msg.HasField("senderRecord"):  # type: ignore[attr-defined]
            return True
        key = (
            peer_id.to_bytes(),  # type: ignore[attr-defined]
            hashlib.blake2b(msg.senderRecord, digest_size=16).digest(),  # type: ignore[attr-defined]
        )
        now = time.monotonic()
        seen = cache.get(key)
        if seen is not None and now - seen < _RECORD_CACHE_TTL_S:
            return True
        ok = original(msg, host, peer_id)
        if ok:
            cache[key] = now
            cache.move_to_end(key)
            while len(cache) > _RECORD_CACHE_SIZE:
                cache.popitem(last=False)
        return ok

    return consume


def _cached_own_record(original: Callable[..., tuple[bytes, bool]]) -> Callable[..., tuple[bytes, bool]]:
    cache: dict[int, tuple[float, bytes]] = {}

    def env_to_send(host: object) -> tuple[bytes, bool]:
        now = time.monotonic()
        hit = cache.get(id(host))
        if hit is not None and now - hit[0] < _OWN_RECORD_TTL_S:
            return hit[1], False
        envelope, created = original(host)
        cache[id(host)] = (now, envelope)
        if len(cache) > _RECORD_CACHE_SIZE:
            cache.clear()
        return envelope, created

    return env_to_send


def _buffered_rpc_reader() -> Callable[..., object]:
    from libp2p.exceptions import ParseError
    from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge

    async def read_limited(reader: object, max_length: int) -> bytes:
        if max_length <= 0:
            raise ValueError("max_length must be greater than 0")
        # The buffer lives on the stream object itself: streams may compare equal to each
        # other (py-libp2p defines equality on them), so a dict keyed by stream would mix them.
        buf: bytearray | None = getattr(reader, "_cocoon_rpc_buffer", None)
        if buf is None:
            buf = bytearray()
            reader._cocoon_rpc_buffer = buf  # type: ignore[attr-defined]
        length = -1
        header = 0
        while True:
            if length < 0:
                n = shift = 0
                for i, b in enumerate(buf[:10]):
                    n |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        length, header = n, i + 1
                        break
                else:
                    if len(buf) >= 10:
                        raise ParseError("Varint decoding error: integer exceeds maximum size of 64 bits")
                if length > max_length:
                    raise MessageTooLarge(f"Message length {length} exceeds maximum allowed {max_length}")
            if length >= 0 and len(buf) >= header + length:
                out = bytes(buf[header : header + length])
                del buf[: header + length]
                return out
            chunk = await reader.read(1 << 16)  # type: ignore[attr-defined]
            if not chunk:
                raise IncompleteReadError(
                    "Stream ended inside an RPC",
                    expected_bytes=max(length, 1),
                    received_bytes=len(buf),
                )
            buf += chunk

    return read_limited


def _publish_to_d_peers(original: Callable[..., Iterable[object]]) -> Callable[..., Iterator[object]]:
    def peers_to_send(
        self: Any,
        topic_ids: Iterable[str],
        msg_forwarder: object,
        origin: object,
        msg_id: bytes | None = None,
    ) -> Iterator[object]:
        topics = list(topic_ids)
        out = set(original(self, topics, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if pubsub is not None and origin == pubsub.my_id:
            for topic in topics:
                mesh = self.mesh.get(topic)
                if mesh is None or len(mesh) >= self.degree or topic not in pubsub.peer_topics:
                    continue
                extra = self._get_in_topic_gossipsub_peers_from_minus(
                    topic, self.degree - len(mesh), set(mesh) | {origin}
                )
                out.update(p for p in extra if p != msg_forwarder)
        yield from out

    return peers_to_send


def _remembered_parents(original: Callable[..., object]) -> Callable[..., object]:
    def find_parent(self: Any, trio_task: object) -> object:
        cache: weakref.WeakKeyDictionary[object, object] | None = getattr(self, "_cocoon_parents", None)
        if cache is None:
            cache = self._cocoon_parents = weakref.WeakKeyDictionary()
        hit = cache.get(trio_task, _MISSING)
        if hit is not _MISSING and (hit is None or hit.trio_task is trio_task):  # type: ignore[attr-defined]
            return hit
        found = original(self, trio_task)
        cache[trio_task] = found
        return found

    return find_parent


async def _window_update_half(stream: Any, *, bytes_read: int = 0) -> None:
    """go-yamux's sendWindowUpdate: grant the consumed bytes once they reach half the window."""
    async with stream.window_lock:
        buffered = len(stream.conn.stream_buffers.get(stream.stream_id, b""))
        delta = stream.target_recv_window - (stream.recv_window + buffered)
        if delta <= 0 or delta < stream.target_recv_window // 2:
            return
        stream.recv_window += delta
        delta += stream._apply_autotune_epoch(buffered)
        stream._pending_recv_release = 0
    await stream.send_window_update(delta, skip_lock=True)


def _whole_noise_writes(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    import trio
    from libp2p.io.exceptions import IOException

    async def write_msg(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before encrypting: nothing is lost
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + NOISE_WRITE_TIMEOUT_S
            await original(self, msg, prefix_encoded)
        if scope.cancelled_caught:  # part of a message may be out: the connection is unusable
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.read_writer.close()
            raise IOException(f"a noise write took over {NOISE_WRITE_TIMEOUT_S} s: connection closed")

    return write_msg


def _spare_relay_legs(original: Callable[..., None]) -> Callable[..., None]:
    def trim(self: Any, peer_id: Any) -> None:
        from .relay import is_relayed_conn

        if any(is_relayed_conn(c) for c in self.connections.get(peer_id, [])):
            return  # a relay leg beside a hole-punched connection: HolePuncher closes it once idle
        original(self, peer_id)

    return trim


def apply_libp2p_fixes() -> None:
    """Apply every workaround (idempotent)."""
    global _applied
    if _applied:
        return
    from libp2p.custom_types import TProtocol
    from libp2p.kad_dht import common, kad_dht, peer_routing, provider_store, value_store
    from libp2p.pubsub import gossipsub, pubsub, utils

    proto = TProtocol(KAD_PROTOCOL)
    for mod in (common, kad_dht, peer_routing, provider_store, value_store):
        mod.PROTOCOL_ID = proto  # type: ignore[attr-defined]

    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

    consume = _cached_record_consumer(utils.maybe_consume_signed_record)
    for mod2 in (utils, pubsub, gossipsub):
        mod2.maybe_consume_signed_record = consume  # type: ignore[attr-defined]

    from libp2p.peer import peerstore
    from libp2p.stream_muxer.yamux import yamux

    env_to_send = _cached_own_record(peerstore.env_to_send_in_RPC)
    for mod3 in (peerstore, pubsub, gossipsub, kad_dht, peer_routing, provider_store, value_store):
        if hasattr(mod3, "env_to_send_in_RPC"):
            mod3.env_to_send_in_RPC = env_to_send  # type: ignore[attr-defined]

    env_cache: dict[tuple[str, str], str] = {}
    read_env = yamux._py_yamux_env

    def yamux_env(name: str, default: str = "") -> str:
        key = (name, default)
        if key not in env_cache:
            env_cache[key] = read_env(name, default)
        return env_cache[key]

    yamux._py_yamux_env = yamux_env
    if not os.environ.get("COCOON_NO_RPC_BUFFER"):
        pubsub.read_varint_prefixed_bytes_limited = _buffered_rpc_reader()  # type: ignore[attr-defined,assignment]
    from libp2p.tools.anyio_service import trio_manager

    trio_manager.TrioManager._find_parent_task = _remembered_parents(  # type: ignore[method-assign,assignment]
        trio_manager.TrioManager._find_parent_task
    )
    if not os.environ.get("COCOON_YAMUX_STOCK_WINDOW"):
        yamux.YamuxStream._auto_tune_and_send_window_update = _window_update_half  # type: ignore[method-assign,assignment]
    gossipsub.GossipSub._get_peers_to_send = _publish_to_d_peers(  # type: ignore[method-assign,assignment]
        gossipsub.GossipSub._get_peers_to_send
    )
    from libp2p.network.swarm import Swarm

    Swarm._trim_connections = _spare_relay_legs(Swarm._trim_connections)  # type: ignore[method-assign]
    from libp2p.security.noise import io as noise_io

    noise_io.BaseNoiseMsgReadWriter.write_msg = _whole_noise_writes(  # type: ignore[method-assign,assignment]
        noise_io.BaseNoiseMsgReadWriter.write_msg
    )
    _applied = True
