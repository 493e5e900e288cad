"""Proxy election and attachment, the pure core.

Theory of operation
-------------------
Time is cut into epochs (:class:`EpochClock`).  A node that wants to be a proxy
for epoch ``E`` gossips a :class:`~market.records.SignedCandidacy` for ``E``,
issued no later than the epoch's *cut-off*, ``start(E) - lead`` (by default one
epoch ahead, so the set of ``E`` is known while ``E - 1`` runs and can be
pre-dialled).  Every node keeps the valid candidacies it saw in a
:class:`CandidacyPool`; after the cut-off it calls :func:`elect`, which is a pure
function of (candidacies issued before the cut-off, the epoch seed): every node
that saw the same candidacies, in any order, computes the same set.

Selection is stake-weighted sampling without replacement (Efraimidis-Spirakis):
``u_i = H(seed || candidate_key_i) / 2^256``, ``key_i = -ln(u_i) / w_i``; the
``k`` smallest keys win, skipping a candidate whose operator already has
``max_per_operator`` seats.  Weights are capped, ``w_i = min(stake_i, cap)``
with ``cap = cap_factor * median stake``, so a whale cannot take every seat;
one stake address backs at most one candidate.

Nodes attach to their top ``r`` proxies by weighted rendezvous hashing
(:func:`attach`): ``score_j = w_j / -ln(H(node || proxy_j || epoch) / 2^256)``.
Removing one proxy moves exactly the nodes that had it, about ``1/k`` of them;
no other node moves.

Handover: the sets of two consecutive epochs overlap for ``overlap`` seconds
after the boundary (:meth:`EpochClock.active_epochs`); sessions that started on
the old set finish there.

Floating point: ``-ln(u)/w`` is computed with IEEE doubles; two keys would have
to agree to the last bit for platforms to order them differently.  Ties are
broken by peer id.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

import attrs

from overlay import wire

from .records import SignedCandidacy

__all__ = [
    "CandidacyPool",
    "ElectedProxy",
    "ElectionParams",
    "EpochClock",
    "EpochSeed",
    "attach",
    "elect",
    "rendezvous_scores",
]

EpochSeed = Callable[[int], bytes]
_TWO_256 = float(1 << 256)


@attrs.frozen
class EpochClock:
    """Epoch arithmetic: epoch ``e`` runs over ``[genesis + e*length, genesis + (e+1)*length)``."""

    genesis: float = 0.0  # s
    length: float = 3600.0  # s
    lead: float = 3600.0  # s: candidacies for E must be issued by start(E) - lead
    overlap: float = 300.0  # s: the previous epoch's set stays usable this long after a boundary

    def epoch_of(self, now: float) -> int:
        return math.floor((now - self.genesis) / self.length)

    def start(self, epoch: int) -> float:
        return self.genesis + epoch * self.length

    def cutoff(self, epoch: int) -> float:
        """The last issue time of a candidacy that counts for ``epoch``."""
        return self.start(epoch) - self.lead

    def active_epochs(self, now: float) -> tuple[int, ...]:
        """Epochs whose proxy sets are in use at ``now``: the current, and the previous during overlap."""
        e = self.epoch_of(now)
        if now - self.start(e) < self.overlap:
            return (e, e - 1)
        return (e,)


@attrs.frozen
class ElectionParams:
    k: int = 32  # proxies per epoch
    max_per_operator: int = 2
    cap_factor: float = 2.0  # weight cap = cap_factor x median stake
    min_stake: int = 1  # nanoTON


@attrs.frozen
class ElectedProxy:
    peer_id: str
    key: bytes  # raw Ed25519 public key
    addrs: tuple[str, ...]
    operator: str
    weight: float  # capped stake, the rendezvous weight


def _supersedes(new: SignedCandidacy, old: SignedCandidacy) -> bool:
    """``new`` replaces ``old``: issued later, or at the same time with a larger encoding (a total order)."""
    if new.body.issued_at != old.body.issued_at:
        return new.body.issued_at > old.body.issued_at
    return wire.encode(new) > wire.encode(old)


class CandidacyPool:
    """Valid candidacies per epoch, one per candidate (the latest issued; ties by encoding).

    The pool trusts its input: feed it only candidacies that passed
    :func:`market.validation.check_candidacy`.
    """

    def __init__(self, clock: EpochClock) -> None:
        self.clock = clock
        self._by_epoch: dict[int, dict[str, SignedCandidacy]] = {}

    def add(self, rec: SignedCandidacy) -> bool:
        """Keep ``rec`` if it is new or supersedes the candidate's earlier one; False if it changes nothing.

        Candidacies issued after their epoch's cut-off never count.
        """
        c = rec.body
        if c.issued_at > self.clock.cutoff(c.epoch):
            return False
        epoch = self._by_epoch.setdefault(c.epoch, {})
        old = epoch.get(c.peer_id)
        if old is not None and not _supersedes(rec, old):
            return False
        epoch[c.peer_id] = rec
        return True

    def candidacies(self, epoch: int) -> list[SignedCandidacy]:
        return list(self._by_epoch.get(epoch, {}).values())

    def prune(self, before_epoch: int) -> None:
        for e in [e for e in self._by_epoch if e < before_epoch]:
            del self._by_epoch[e]

    def epochs(self) -> list[int]:
        return sorted(self._by_epoch)


def _unit(*parts: bytes) -> float:
    """A hash mapped into the open interval (0, 1)."""
    h = hashlib.sha256(b"".join(len(p).to_bytes(2, "big") + p for p in parts)).digest()
    return (int.from_bytes(h, "big") + 1) / (_TWO_256 + 2)


def _median(values: Sequence[int]) -> float:
    s = sorted(values)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def elect(
    candidacies: Iterable[SignedCandidacy],
    epoch: int,
    seed: bytes,
    params: ElectionParams | None = None,
) -> tuple[ElectedProxy, ...]:
    """The proxies of ``epoch``, in selection order: a pure function of the set of candidacies and the seed.

    Candidacies for other epochs or below ``min_stake`` are skipped; when several
    candidates share a stake address only the one with the smallest peer id counts.
    """
    params = params or ElectionParams()
    best: dict[str, SignedCandidacy] = {}
    for rec in candidacies:
        c = rec.body
        if c.epoch != epoch or c.stake_amount < params.min_stake:
            continue
        old = best.get(c.peer_id)
        if old is None or _supersedes(rec, old):
            best[c.peer_id] = rec
    by_address: dict[str, SignedCandidacy] = {}
    for rec in best.values():
        c = rec.body
        old = by_address.get(c.stake_address)
        if old is None or c.peer_id < old.body.peer_id:
            by_address[c.stake_address] = rec
    pool = list(by_address.values())
    if not pool:
        return ()
    cap = params.cap_factor * _median([r.body.stake_amount for r in pool])
    epoch_bytes = epoch.to_bytes(8, "big", signed=True)
    keyed: list[tuple[float, str, SignedCandidacy, float]] = []
    for rec in pool:
        c = rec.body
        weight = min(float(c.stake_amount), cap)
        u = _unit(b"cocoon-elect", seed, epoch_bytes, c.candidate_key)
        keyed.append((-math.log(u) / weight, c.peer_id, rec, weight))
    keyed.sort(key=lambda t: (t[0], t[1]))
    seats: dict[str, int] = {}
    chosen: list[ElectedProxy] = []
    for _, peer_id, rec, weight in keyed:
        if len(chosen) >= params.k:
            break
        c = rec.body
        if seats.get(c.operator, 0) >= params.max_per_operator:
            continue
        seats[c.operator] = seats.get(c.operator, 0) + 1
        chosen.append(ElectedProxy(peer_id, c.candidate_key, c.addrs, c.operator, weight))
    return tuple(chosen)


def rendezvous_scores(node_id: str, proxies: Sequence[ElectedProxy], epoch: int) -> list[tuple[float, str]]:
    """Weighted rendezvous scores of every proxy for ``node_id``, best first."""
    node = node_id.encode()
    epoch_bytes = epoch.to_bytes(8, "big", signed=True)
    scored = [
        (p.weight / -math.log(_unit(b"cocoon-attach", node, p.peer_id.encode(), epoch_bytes)), p.peer_id)
        for p in proxies
    ]
    scored.sort(key=lambda t: (-t[0], t[1]))
    return scored


def attach(node_id: str, proxies: Sequence[ElectedProxy], epoch: int, r: int = 3) -> list[str]:
    """The ``r`` proxies ``node_id`` attaches to, best first (on failure, move down the list)."""
    return [peer for _, peer in rendezvous_scores(node_id, proxies, epoch)[:r]]
