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
  (peer, record) pair is remembered for 10 minutes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["KAD_PROTOCOL", "apply_libp2p_fixes"]

KAD_PROTOCOL = "/cocoon/kad/1.0.0"
_RECORD_CACHE_SIZE = 4096
_RECORD_CACHE_TTL_S = 600.0
_applied = False


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
    _applied = True
