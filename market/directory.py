"""Which proxies exist: the election view fed by gossip and the DHT, and the candidate's announcements.

:class:`Directory` wraps one :class:`~market.core.ElectionView` per node.  It
listens to the candidacy topic (its validator is the core, so invalid
candidacies cost the forwarder and are never relayed), fetches the
candidacies of the current and next epochs from the DHT when it starts (a node
that joins late missed the gossip), and answers two questions for the other
shells: *which proxies should this node use* (its top ``r`` by rendezvous
hashing among the current epoch's elected set, falling back to the bootstrap
list while no election has produced a set) and *is this peer an active proxy*
(elected for the current epoch, or the previous one during the overlap).

A proxy candidate also gets a :class:`Candidate`: the directory announces a
signed candidacy for each epoch whose cut-off is still ahead, on gossip and in
the DHT (as a record and as a provider), again every ``announce_every``
seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs
import trio

from overlay import wire
from overlay.errors import DecodeError, NodeError
from overlay.gossip import Validation
from overlay.identity import Identity

from .core import ElectionView
from .election import attach
from .protocols import (
    CANDIDACY_NAMESPACE,
    CANDIDACY_TOPIC,
    DhtLike,
    MarketOverlay,
    MarketSettings,
    candidacy_key,
    drain,
    providers_key,
    to_validation,
)
from .records import Candidacy, SignedCandidacy, peer_id_matches, sign_candidacy, signature_valid

__all__ = ["Candidate", "Directory", "ProxyRef"]

log = logging.getLogger(__name__)


@attrs.frozen
class ProxyRef:
    peer_id: str
    addrs: tuple[str, ...] = ()  # multiaddrs without /p2p/ (dialled with the peer id)


@attrs.frozen
class Candidate:
    """What a proxy candidate needs to announce itself."""

    stake: Identity  # the Ed25519 key of the TON wallet holding the stake
    stake_address: str  # that wallet's address
    operator: str  # who runs this proxy (at most 2 seats per operator)
    stake_amount: Callable[[int], int]  # nanoTON the chain backend reports for an epoch


def _valid_dht_candidacy(key: str, value: bytes) -> bool:
    """DHT record check: a well-formed candidacy, correctly signed, stored under its own key."""
    try:
        rec = wire.decode_as(SignedCandidacy, value)
    except DecodeError:
        return False
    return (
        key == candidacy_key(rec.body.epoch, rec.body.peer_id)
        and peer_id_matches(rec)
        and signature_valid(rec)
    )


def _newest(key: str, values: list[bytes]) -> int:
    def issued(v: bytes) -> float:
        try:
            return wire.decode_as(SignedCandidacy, v).body.issued_at
        except DecodeError:
            return float("-inf")

    return max(range(len(values)), key=lambda i: issued(values[i])) if values else 0


class Directory:
    """The elected proxies as this node sees them; see the module docstring."""

    def __init__(
        self,
        overlay: MarketOverlay,
        identity: Identity,
        view: ElectionView,
        *,
        dht: DhtLike | None = None,
        bootstrap: tuple[ProxyRef, ...] = (),
        candidate: Candidate | None = None,
        settings: MarketSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.overlay = overlay
        self.identity = identity
        self.view = view
        self.dht = dht
        self.bootstrap = bootstrap
        self.candidate = candidate
        self.settings = settings or MarketSettings()
        self.clock = clock
        self.announced = 0
        self._addrs: dict[str, tuple[str, ...]] = {p.peer_id: p.addrs for p in bootstrap}
        self.changed = trio.Event()

    # ---- queries

    def elected(self, now: float | None = None) -> list[ProxyRef]:
        """The current epoch's elected proxies (empty until an election produced a set)."""
        now = self.clock() if now is None else now
        return [ProxyRef(p.peer_id, p.addrs) for p in self.view.proxies(self.view.clock.epoch_of(now))]

    def proxies_for(self, node_id: str, r: int | None = None, now: float | None = None) -> list[ProxyRef]:
        """The proxies ``node_id`` should use, best first: its top ``r`` elected, else the bootstrap list."""
        now = self.clock() if now is None else now
        r = self.settings.proxies_per_node if r is None else r
        epoch = self.view.clock.epoch_of(now)
        elected = self.view.proxies(epoch)
        if elected:
            by_id = {p.peer_id: p for p in elected}
            return [ProxyRef(pid, by_id[pid].addrs) for pid in attach(node_id, elected, epoch, r)]
        return list(self.bootstrap[:r])

    def is_active_proxy(self, peer_id: str, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        if self.view.is_active_proxy(peer_id, now):
            return True
        no_set = not self.view.proxies(self.view.clock.epoch_of(now))
        return no_set and any(p.peer_id == peer_id for p in self.bootstrap)

    # ---- input

    def _validate(self, origin: str, data: bytes) -> Validation:
        try:
            rec = wire.decode_as(SignedCandidacy, data)
        except DecodeError:
            return Validation.REJECT
        outcome = self.view.receive_candidacy(rec, self.clock(), origin)
        if outcome.accepted:
            self._changed()
        return to_validation(outcome)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked on new candidacies and at epoch boundaries."""
        while not predicate():
            await self.changed.wait()

    async def fetch_from_dht(self, epoch: int) -> int:
        """Load the candidacies of ``epoch`` from the DHT; returns how many were new."""
        if self.dht is None:
            return 0
        added = 0
        try:
            providers = await self.dht.find_providers(providers_key(epoch))
        except NodeError as e:
            log.info(
                "no candidacy providers for epoch %d: %s", epoch, e, extra={"peer_id": self.identity.peer_id}
            )
            return 0
        for prov in providers:
            try:
                value = await self.dht.get(candidacy_key(epoch, prov.peer_id))
            except NodeError:
                continue
            if value is None:
                continue
            try:
                rec = wire.decode_as(SignedCandidacy, value)
            except DecodeError:
                continue
            if self.view.receive_candidacy(rec, self.clock(), prov.peer_id).accepted:
                added += 1
        if added:
            self._changed()
        return added

    # ---- the candidate's side

    def candidacy(self, epoch: int, now: float) -> SignedCandidacy | None:
        """Our signed candidacy for ``epoch``, if we are a candidate and its cut-off is ahead."""
        c = self.candidate
        clock = self.view.clock
        if c is None or now > clock.cutoff(epoch):
            return None
        expires = min(clock.start(epoch + 1) + clock.overlap, now + self.view.limits.max_candidacy_lifetime)
        body = Candidacy(
            candidate_key=self.identity.public_key,
            peer_id=self.identity.peer_id,
            addrs=tuple(a.rsplit("/p2p/", 1)[0] for a in self.overlay.listen_addrs())[:8],
            operator=c.operator,
            stake_address=c.stake_address,
            stake_key=c.stake.public_key,
            stake_amount=c.stake_amount(epoch),
            epoch=epoch,
            issued_at=now,
            expires_at=expires,
        )
        return sign_candidacy(self.identity, c.stake, body)

    async def announce(self) -> int:
        """Publish our candidacies for the epochs still open; returns how many."""
        now = self.clock()
        current = self.view.clock.epoch_of(now)
        sent = 0
        for epoch in (current + 1, current + 2):
            rec = self.candidacy(epoch, now)
            if rec is None:
                continue
            data = wire.encode(rec)
            # Publish first: the overlay runs our own validator on our publishes (as py-libp2p does),
            # and a candidacy already in the pool would be IGNOREd as a duplicate and never sent.
            await self.overlay.publish(CANDIDACY_TOPIC, data)
            self.view.receive_candidacy(rec, now, self.identity.peer_id)
            if self.dht is not None:
                try:
                    await self.dht.put(candidacy_key(epoch, self.identity.peer_id), data)
                    await self.dht.provide(providers_key(epoch))
                except NodeError as e:
                    log.info(
                        "candidacy not stored in the DHT: %s", e, extra={"peer_id": self.identity.peer_id}
                    )
            sent += 1
        self.announced += sent
        if sent:
            self._changed()
        return sent

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.dht is not None:
            self.dht.register_namespace(CANDIDACY_NAMESPACE, _valid_dht_candidacy, _newest)
        sub = await self.overlay.subscribe(CANDIDACY_TOPIC, self._validate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, sub)
            task_status.started()
            fetched: set[int] = set()
            while True:
                now = self.clock()
                current = self.view.clock.epoch_of(now)
                for epoch in (current, current + 1, current + 2):
                    if epoch not in fetched and not self.view.proxies(epoch):
                        fetched.add(epoch)
                        nursery.start_soon(self.fetch_from_dht, epoch)
                if self.candidate is not None:
                    await self.announce()
                self.view.prune(now)
                # Wake at the next epoch boundary or announcement, whichever comes first.
                to_boundary = self.view.clock.start(current + 1) - now
                await trio.sleep(max(0.05, min(self.settings.announce_every, to_boundary + 0.01)))
                if self.view.clock.epoch_of(self.clock()) != current:
                    self._changed()  # a new epoch: another elected set
