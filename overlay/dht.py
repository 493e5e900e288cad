"""Kademlia DHT on a private protocol id, with strict namespaced validators.

Keys look like ``/<namespace>/<rest>``; a namespace must be registered with a
validator before any record in it is stored or accepted (``strict_validation``).
py-libp2p 0.8.1 ignores ``protocol_prefix`` (bug B8), so
``patches.apply_libp2p_fixes`` rewrites the module constants to
``/cocoon/kad/1.0.0`` before any DHT is built: our nodes never talk to the
public IPFS DHT and it never talks to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from .errors import OverlayError, RecordRejected
from .patches import KAD_PROTOCOL

__all__ = ["KAD_PROTOCOL", "DhtFacade", "ProviderRecord"]

log = logging.getLogger(__name__)
RecordCheck = Callable[[str, bytes], bool]
RecordSelect = Callable[[str, list[bytes]], int]
_QUERY_TIMEOUT_S = 20.0


@attrs.frozen
class ProviderRecord:
    peer_id: str
    addrs: tuple[str, ...]


def _make_validator(check: RecordCheck, select: RecordSelect | None) -> object:
    from libp2p.records.validator import Validator

    class _AppValidator(Validator):
        def validate(self, key: str, value: bytes) -> None:
            if not check(key, value):
                raise RecordRejected(f"record {key!r} rejected by its namespace validator")

        def select(self, key: str, values: list[bytes]) -> int:
            return 0 if select is None else select(key, values)

    return _AppValidator()


class DhtFacade:
    """Our narrow view of py-libp2p's KadDHT."""

    def __init__(self, host: object, *, server: bool, peer_id: str) -> None:
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.records.validator import NamespacedValidator

        self.peer_id = peer_id
        self.quorum = 2  # valid answers a get waits for (then the best of them wins); 0 waits for all
        self._validators: dict[str, object] = {}
        self._nsv = NamespacedValidator(self._validators, strict_validation=True)  # type: ignore[arg-type]
        self.kad = KadDHT(
            host,  # type: ignore[arg-type]
            DHTMode.SERVER if server else DHTMode.CLIENT,
            validator=self._nsv,
            validator_changed=True,
            strict_validation=True,
        )

    @property
    def server(self) -> bool:
        from libp2p.kad_dht.kad_dht import DHTMode

        return bool(self.kad.mode == DHTMode.SERVER)

    async def set_server(self, server: bool) -> None:
        """Answer DHT queries (server mode) or not (client mode: behind NAT)."""
        from libp2p.kad_dht.kad_dht import DHTMode

        if server != self.server:
            await self.kad.switch_mode(DHTMode.SERVER if server else DHTMode.CLIENT)
            log.info("DHT now in %s mode", "server" if server else "client", extra={"peer_id": self.peer_id})

    def register_namespace(
        self, namespace: str, check: RecordCheck, select: RecordSelect | None = None
    ) -> None:
        """Accept records under ``/<namespace>/`` for which ``check(key, value)`` is True."""
        if not namespace or "/" in namespace:
            raise ValueError("a namespace is one path component")
        self._validators[namespace] = _make_validator(check, select)

    async def add_peer(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        try:
            await self.kad.add_peer(ID.from_base58(peer_id), skip_server_mode_check=True)
        except Exception as e:  # a peer that is not a DHT server is not an error for us
            log.debug("add_peer %s: %s", peer_id, e, extra={"peer_id": self.peer_id})

    async def refresh(self) -> None:
        with trio.move_on_after(_QUERY_TIMEOUT_S):
            try:
                await self.kad.refresh_routing_table()
            except Exception as e:
                log.debug("routing table refresh: %s", e, extra={"peer_id": self.peer_id})

    def routing_table_size(self) -> int:
        return int(self.kad.get_routing_table_size())

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` locally and at the closest peers."""
        try:
            with trio.fail_after(_QUERY_TIMEOUT_S):
                await self.kad.put_value(key, value)
        except RecordRejected:
            raise
        except trio.TooSlowError as e:
            raise OverlayError(f"DHT put {key!r} timed out") from e
        except Exception as e:
            if type(e).__name__ == "InvalidRecordType":
                raise RecordRejected(f"no validator for the namespace of {key!r}") from e
            raise OverlayError(f"DHT put {key!r} failed: {e}") from e

    def _check_namespace(self, key: str) -> None:
        ns = key[1:].split("/", 1)[0] if key.startswith("/") and key.count("/") >= 2 else ""
        if ns not in self._validators:
            raise RecordRejected(f"no validator for the namespace of {key!r}: no record there is valid")

    async def get(self, key: str) -> bytes | None:
        """The best value under ``key`` (None when nobody has one)."""
        self._check_namespace(key)
        try:
            with trio.fail_after(_QUERY_TIMEOUT_S):
                value = await self.kad.get_value(key, quorum=self.quorum)
        except trio.TooSlowError as e:
            raise OverlayError(f"DHT get {key!r} timed out") from e
        except Exception as e:
            raise OverlayError(f"DHT get {key!r} failed: {e}") from e
        return None if value is None else bytes(value)

    def forget_local(self, key: str) -> None:
        """Drop our local copy of ``key`` (so the next get is a real network lookup)."""
        self.kad.value_store.store.pop(key.encode(), None)

    async def provide(self, key: str) -> bool:
        try:
            with trio.fail_after(_QUERY_TIMEOUT_S):
                return bool(await self.kad.provide(key))
        except trio.TooSlowError as e:
            raise OverlayError(f"DHT provide {key!r} timed out") from e

    async def find_providers(self, key: str, count: int = 20) -> list[ProviderRecord]:
        """Providers of ``key``, one record per peer.

        py-libp2p's own lookup returns the local records alone when it has any,
        and counts repeated providers towards ``count`` (B7), so it misses
        providers.  We merge the local records with those of the closest peers.
        """
        from libp2p.kad_dht.kad_dht import _encode_key
        from libp2p.peer.id import ID

        k = _encode_key(key)
        store = self.kad.provider_store
        seen: dict[str, set[str]] = {}

        def add(infos: object) -> None:
            for info in infos or []:  # type: ignore[attr-defined]
                seen.setdefault(str(info.peer_id), set()).update(str(a) for a in info.addrs)

        add(store.get_providers(k))

        async def ask(peer: ID) -> None:
            with trio.move_on_after(5):
                try:
                    providers, _ = await store._get_providers_from_peer_with_closers(peer, k)
                except Exception as e:  # one peer failing is not the lookup failing
                    log.debug("providers from %s: %s", peer, e)
                    return
                add(providers)

        try:
            with trio.fail_after(_QUERY_TIMEOUT_S):
                closest = await self.kad.peer_routing.find_closest_peers_network(k)
                async with trio.open_nursery() as n:
                    for peer in list(closest)[:20]:
                        if str(peer) != self.peer_id:
                            n.start_soon(ask, peer)
        except trio.TooSlowError as e:
            raise OverlayError(f"DHT find_providers {key!r} timed out") from e
        return [ProviderRecord(p, tuple(sorted(a))) for p, a in seen.items()][:count]
