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

A proxy candidate also gets a :class:`Candidate`: every ``announce_every``
seconds the directory publishes on gossip a signed candidacy for each epoch
whose cut-off is at most two epoch lengths ahead (so every epoch gets two
epochs' worth of chances, and one missed round never leaves an epoch without
its proxies).  Storing them in the DHT (as a record and as a provider) happens
in the background, once per epoch unless the candidacy changes: a slow or
stalled DHT must never hold up the gossip announcements, which alone decide
whether a candidacy is in before its cut-off.

Nodes that joined late fetch from the DHT the candidacies of the epochs whose
cut-off has passed (those sets are final and nobody re-announces them), one
lookup at a time.

:meth:`Directory.handover_proxies` is the set a worker keeps heartbeat streams
to: its proxies of the current epoch, plus those of the previous epoch during
the overlap and those of the next epoch during the last ``overlap`` seconds
before the boundary, so that a new epoch's proxies already know the worker's
load when it begins.
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
        self.stored = 0  # candidacies stored in the DHT
        self._addrs: dict[str, tuple[str, ...]] = {p.peer_id: p.addrs for p in bootstrap}
        self.changed = trio.Event()
        self._own: dict[int, SignedCandidacy] = {}  # epoch -> our candidacy as last published
        self._to_store: dict[int, SignedCandidacy] = {}  # epoch -> latest candidacy not yet in the DHT
        self._stored: dict[int, Candidacy] = {}  # epoch -> what the DHT holds (times zeroed)
        self._store_wake = trio.Event()
        self._fetch_lock = trio.Lock()
        self._started_at: float | None = None

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
        return self._attached(node_id, epoch, r) or list(self.bootstrap[:r])

    def _attached(self, node_id: str, epoch: int, r: int) -> list[ProxyRef]:
        elected = self.view.proxies(epoch)
        by_id = {p.peer_id: p for p in elected}
        return [ProxyRef(pid, by_id[pid].addrs) for pid in attach(node_id, elected, epoch, r)]

    def handover_proxies(
        self, node_id: str, r: int | None = None, now: float | None = None
    ) -> list[ProxyRef]:
        """The proxies ``node_id`` keeps streams to around epoch boundaries (see the module docstring).

        :meth:`proxies_for` first, then the previous epoch's during the overlap, then
        the next epoch's (once its cut-off has passed) in the last ``overlap`` seconds.
        """
        now = self.clock() if now is None else now
        r = self.settings.proxies_per_node if r is None else r
        clock = self.view.clock
        epoch = clock.epoch_of(now)
        out = self.proxies_for(node_id, r, now)
        if now - clock.start(epoch) < clock.overlap:
            out += self._attached(node_id, epoch - 1, r)
        if clock.start(epoch + 1) - now <= clock.overlap and clock.cutoff(epoch + 1) <= now:
            out += self._attached(node_id, epoch + 1, r)
        unique: dict[str, ProxyRef] = {}
        for p in out:
            unique.setdefault(p.peer_id, p)
        return list(unique.values())

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
        if origin == self.identity.peer_id and self._own.get(rec.body.epoch) == rec:
            return Validation.ACCEPT  # our own re-announcement: let it out (peers that have it ignore it)
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
        async with self._fetch_lock:  # one lookup at a time: a DHT storm helps nobody
            return await self._fetch(self.dht, epoch)

    async def _fetch(self, dht: DhtLike, epoch: int) -> int:
        added = 0
        try:
            providers = await dht.find_providers(providers_key(epoch))
        except NodeError as e:
            log.info(
                "no candidacy providers for epoch %d: %s", epoch, e, extra={"peer_id": self.identity.peer_id}
            )
            return 0
        for prov in providers:
            try:
                value = await dht.get(candidacy_key(epoch, prov.peer_id))
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

    def open_epochs(self, now: float) -> list[int]:
        """Epochs a candidate announces itself for at ``now``: cut-off ahead, at most two lengths away."""
        clock = self.view.clock
        epoch = clock.epoch_of(now) + 1
        while clock.cutoff(epoch) < now:
            epoch += 1
        out = []
        while clock.cutoff(epoch) <= now + 2 * clock.length:
            out.append(epoch)
            epoch += 1
        return out

    async def announce(self) -> int:
        """Publish our candidacies for the epochs still open on gossip; returns how many.

        A candidacy is signed again only when what it says changes (or half its
        lifetime has passed); otherwise the same record goes out again, which
        peers that already hold it ignore instead of relaying, so re-announcing
        costs one copy per neighbour rather than a flood.  Storing candidacies in
        the DHT is left to :meth:`run`'s background task.
        """
        now = self.clock()
        sent = 0
        for epoch in self.open_epochs(now):
            fresh = self.candidacy(epoch, now)
            if fresh is None:
                continue
            rec = self._own.get(epoch)
            if rec is None or not self._still_good(rec, fresh, now):
                rec = fresh
            self._own[epoch] = rec
            await self.overlay.publish(CANDIDACY_TOPIC, wire.encode(rec))
            self.view.receive_candidacy(rec, now, self.identity.peer_id)
            if self.dht is not None and self._stored.get(epoch) != _essence(rec.body):
                self._to_store[epoch] = rec
                self._store_wake.set()
            sent += 1
        for old in [e for e in self._own if self.view.clock.cutoff(e) < now]:
            del self._own[old]
        self.announced += sent
        if sent:
            self._changed()
        return sent

    def _still_good(self, old: SignedCandidacy, fresh: SignedCandidacy, now: float) -> bool:
        """Whether ``old`` can be announced again instead of ``fresh`` (same content, not near expiry)."""
        half_life = now + self.view.limits.max_candidacy_lifetime / 2
        return _essence(old.body) == _essence(fresh.body) and old.body.expires_at >= min(
            fresh.body.expires_at, half_life
        )

    async def _store_candidacies(self, dht: DhtLike) -> None:
        """Store queued candidacies in the DHT, oldest epoch first; failures retry at the next announce."""
        while True:
            if not self._to_store:
                await self._store_wake.wait()
                self._store_wake = trio.Event()
                continue
            epoch = min(self._to_store)
            rec = self._to_store.pop(epoch)
            essence = _essence(rec.body)
            if self._stored.get(epoch) == essence or self.clock() > self.view.clock.start(epoch + 1):
                continue
            try:
                await dht.put(candidacy_key(epoch, self.identity.peer_id), wire.encode(rec))
                await dht.provide(providers_key(epoch))
            except NodeError as e:
                log.info(
                    "candidacy for epoch %d not stored in the DHT: %s",
                    epoch,
                    e,
                    extra={"peer_id": self.identity.peer_id},
                )
                continue
            self._stored[epoch] = essence
            self.stored += 1
            current = self.view.clock.epoch_of(self.clock())
            for old in [e for e in self._stored if e < current - 1]:
                del self._stored[old]

    def _wants_fetch(self, epoch: int, now: float) -> bool:
        """Whether to look ``epoch``'s candidacies up in the DHT.

        Only once its cut-off has passed (the set is final and nobody re-announces it),
        and only if we know no set for it or were not listening during its last
        announcement rounds.
        """
        cutoff = self.view.clock.cutoff(epoch)
        if cutoff > now:
            return False
        started = now if self._started_at is None else self._started_at
        joined_late = started > cutoff - 2 * self.settings.announce_every
        return joined_late or not self.view.proxies(epoch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.dht is not None:
            self.dht.register_namespace(CANDIDACY_NAMESPACE, _valid_dht_candidacy, _newest)
        sub = await self.overlay.subscribe(CANDIDACY_TOPIC, self._validate)
        self._started_at = self.clock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, sub)
            if self.dht is not None and self.candidate is not None:
                nursery.start_soon(self._store_candidacies, self.dht)
            task_status.started()
            fetched: set[int] = set()
            while True:
                now = self.clock()
                current = self.view.clock.epoch_of(now)
                if self.candidate is not None:
                    await self.announce()
                for epoch in (current, current + 1, current + 2):
                    if self.dht is not None and epoch not in fetched and self._wants_fetch(epoch, now):
                        fetched.add(epoch)
                        nursery.start_soon(self.fetch_from_dht, epoch)
                self.view.prune(now)
                # Wake at the next epoch boundary or announcement, whichever comes first.
                to_boundary = self.view.clock.start(current + 1) - now
                await trio.sleep(max(0.05, min(self.settings.announce_every, to_boundary + 0.01)))
                if self.view.clock.epoch_of(self.clock()) != current:
                    self._changed()  # a new epoch: another elected set


def _essence(c: Candidacy) -> Candidacy:
    """What an election reads from a candidacy (its times zeroed): equal essences elect alike."""
    return attrs.evolve(c, issued_at=0.0, expires_at=0.0)
