"""Validation of signed market records, the pure core.

Every gossiped record passes one validator before it may touch the offer book
or the election.  A validator returns an :class:`Outcome`:

- ``REJECT``: the record is malformed, forged, or makes absurd claims.  Its
  sender (the peer that relayed it to us) loses peer score; gossip drops it.
- ``IGNORE``: well-formed and authentic but not useful now: expired, from the
  future (more than ``max_skew`` ahead), a stale or replayed seqno, or a flood
  (offers of one worker issued less than ``min_publish_interval`` apart).  No penalty.
- ``ACCEPT``: the caller may insert it and relay it.

Validators are stateful only in what replay protection needs (the highest
seqno and issue time accepted per worker), take ``now`` explicitly and never
read a clock.  Peer scores are kept here, by our own code: py-libp2p's
validators return only a bool and its scoring weights default to zero.

A replayed record never re-enters the book: acceptance requires a seqno above,
and an issue time not below, the last accepted one; a worker's state is
forgotten only after everything it ever had accepted has expired.
"""

from __future__ import annotations

import enum
import math
from typing import Protocol

import attrs

from .records import (
    ATTESTED_TIERS,
    TIERS,
    SignatureCheck,
    SignedCandidacy,
    SignedMarketStats,
    SignedOffer,
    SignedVerdict,
    peer_id_matches,
    signature_valid,
)

__all__ = [
    "Decision",
    "MarketLimits",
    "OfferValidator",
    "Outcome",
    "PeerScores",
    "StakeOracle",
    "StakeTable",
    "check_candidacy",
    "check_market_stats",
    "check_verdict",
]

_KEY = 32
_SIG = 64
_HASH = 32
_LN2 = math.log(2.0)


class Decision(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    IGNORE = "ignore"


@attrs.frozen
class Outcome:
    decision: Decision
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.decision is Decision.ACCEPT


ACCEPT = Outcome(Decision.ACCEPT)


def _reject(reason: str) -> Outcome:
    return Outcome(Decision.REJECT, reason)


def _ignore(reason: str) -> Outcome:
    return Outcome(Decision.IGNORE, reason)


@attrs.frozen
class MarketLimits:
    """Bounds a record must respect; beyond them it is absurd (REJECT) or untimely (IGNORE)."""

    max_skew: float = 30.0  # s: records issued further in the future are ignored
    max_lifetime: float = 900.0  # s: an offer's expires_at - issued_at above this is rejected
    max_verdict_lifetime: float = 86_400.0  # s: the same for attestation verdicts
    # s: the same for candidacies, which outlive their epoch (issued a lead ahead: lead + length + overlap)
    max_candidacy_lifetime: float = 4 * 3600.0
    min_publish_interval: float = 10.0  # s: offers of one worker must be issued this far apart
    max_price: int = 10**12  # nanoTON per token (1,000 TON): anything above is absurd
    max_capacity: int = 4096  # concurrent requests of one worker
    max_context: int = 10_000_000  # tokens
    max_tok_s: float = 1e6  # tokens/s
    max_stake: int = 10**19  # nanoTON (10 billion TON, above TON's total supply)


class PeerScores:
    """Per-peer behaviour scores: penalties decay towards zero with a half-life.

    A peer whose score falls below ``graylist_below`` is graylisted: the shell
    drops everything it sends until the score recovers.
    """

    def __init__(
        self,
        *,
        reject_penalty: float = 10.0,  # points per rejected record
        graylist_below: float = -100.0,  # points
        half_life: float = 600.0,  # s
    ) -> None:
        self.reject_penalty = reject_penalty
        self.graylist_below = graylist_below
        self.half_life = half_life
        self._scores: dict[str, tuple[float, float]] = {}  # peer -> (score, at)

    def score(self, peer: str, now: float) -> float:
        entry = self._scores.get(peer)
        if entry is None:
            return 0.0
        value, at = entry
        return value * math.exp(-_LN2 * max(0.0, now - at) / self.half_life)

    def penalize(self, peer: str, now: float, points: float | None = None) -> float:
        value = self.score(peer, now) - (self.reject_penalty if points is None else points)
        self._scores[peer] = (value, now)
        return value

    def record(self, peer: str | None, outcome: Outcome, now: float) -> None:
        """Charge ``peer`` for a REJECT; ACCEPT and IGNORE cost nothing."""
        if peer is not None and outcome.decision is Decision.REJECT:
            self.penalize(peer, now)

    def graylisted(self, peer: str, now: float) -> bool:
        return self.score(peer, now) < self.graylist_below

    def prune(self, now: float, epsilon: float = 0.5) -> None:
        """Forget peers whose score decayed to within ``epsilon`` of zero."""
        for peer in [p for p in self._scores if abs(self.score(p, now)) < epsilon]:
            del self._scores[peer]

    def __len__(self) -> int:
        return len(self._scores)


_isfinite = math.isfinite


def _finite(*values: float) -> bool:
    """All finite numbers (wire decoding guarantees floats; hand-built records might not)."""
    try:
        return all(map(_isfinite, values))
    except TypeError:
        return False


def _check_times(
    issued_at: float, expires_at: float, now: float, limits: MarketLimits, max_lifetime: float | None = None
) -> Outcome | None:
    """Schema problems -> REJECT; untimely -> IGNORE; fine -> None."""
    if not (_finite(issued_at, expires_at) and expires_at > issued_at):
        return _reject("bad validity window")
    # (a microsecond of slack: issued_at + lifetime rounds in floating point)
    if expires_at - issued_at > (limits.max_lifetime if max_lifetime is None else max_lifetime) + 1e-6:
        return _reject("lifetime over the limit")
    if issued_at > now + limits.max_skew:
        return _ignore("issued in the future")
    if expires_at <= now:
        return _ignore("expired")
    return None


def _check_offer_schema(rec: SignedOffer, limits: MarketLimits) -> str | None:
    o = rec.body
    if len(o.worker_key) != _KEY or len(rec.signature) != _SIG:
        return "bad key or signature length"
    if o.tier not in TIERS:
        return f"unknown tier {o.tier!r}"
    if len(o.model_hash) != _HASH or not o.model_id:
        return "bad model id or hash"
    if o.tier in ATTESTED_TIERS and len(o.attestation_hash) != _HASH:
        return "attested tier without a report hash"
    if len(o.attestation_hash) not in (0, _HASH):
        return "bad report hash"  # tier none may name a report too (it carries the sealing keys)
    if not (0 <= o.price_prompt <= limits.max_price and 0 <= o.price_completion <= limits.max_price):
        return "absurd price"
    if not 0 <= o.capacity <= limits.max_capacity:
        return "absurd capacity"
    if not 0 < o.max_context <= limits.max_context:
        return "absurd context length"
    if not (_finite(o.decode_tok_s) and 0 < o.decode_tok_s <= limits.max_tok_s):
        return "absurd decode speed"
    if o.seqno < 0:
        return "negative seqno"
    return None


@attrs.define
class _WorkerState:
    seqno: int
    issued_at: float
    accepted_at: float
    max_expires_at: float
    withdrawn: bool


class OfferValidator:
    """Validates gossiped offers; keeps per-worker replay and flood state."""

    def __init__(
        self,
        limits: MarketLimits | None = None,
        scores: PeerScores | None = None,
        *,
        check_signature: SignatureCheck = signature_valid,
    ) -> None:
        self.limits = limits or MarketLimits()
        self.scores = scores or PeerScores()
        self.check_signature = check_signature
        self._workers: dict[str, _WorkerState] = {}

    def validate(self, rec: SignedOffer, now: float, source: str | None = None) -> Outcome:
        """Decide on ``rec`` relayed by ``source``; an ACCEPT updates the replay state."""
        outcome = self._decide(rec, now)
        self.scores.record(source, outcome, now)
        return outcome

    def _decide(self, rec: SignedOffer, now: float) -> Outcome:
        o = rec.body
        problem = _check_offer_schema(rec, self.limits)
        if problem is not None:
            return _reject(problem)
        timing = _check_times(o.issued_at, o.expires_at, now, self.limits)
        if timing is not None and timing.decision is Decision.REJECT:
            return timing
        if not peer_id_matches(rec):
            return _reject("peer id does not match the key")
        if not self.check_signature(rec):
            return _reject("bad signature")
        if timing is not None:
            return timing
        state = self._workers.get(o.peer_id)
        withdrawal = o.capacity == 0
        if state is not None:
            if o.seqno <= state.seqno or o.issued_at < state.issued_at:
                return _ignore("stale or replayed seqno")
            # Rate limit on the signed issue times (arrival times jitter; issue times are the
            # worker's own and monotonic, and at most max_skew ahead of ours). A withdrawal
            # may follow a live offer at once.
            if o.issued_at - state.issued_at < self.limits.min_publish_interval and (
                not withdrawal or state.withdrawn
            ):
                return _ignore("more than one offer per interval")
            state.seqno, state.issued_at, state.accepted_at = o.seqno, o.issued_at, now
            state.max_expires_at = max(state.max_expires_at, o.expires_at)
            state.withdrawn = withdrawal
        else:
            self._workers[o.peer_id] = _WorkerState(o.seqno, o.issued_at, now, o.expires_at, withdrawal)
        return ACCEPT

    def last_seqno(self, peer_id: str) -> int | None:
        state = self._workers.get(peer_id)
        return None if state is None else state.seqno

    def prune(self, now: float) -> int:
        """Forget workers all of whose accepted offers expired (so their replays are expired too)."""
        gone = [p for p, s in self._workers.items() if s.max_expires_at + self.limits.max_skew < now]
        for p in gone:
            del self._workers[p]
        return len(gone)

    def __len__(self) -> int:
        return len(self._workers)


# --------------------------------------------------------------------------- stake


class StakeOracle(Protocol):
    """What the chain backend tells the market about stake, synchronously (a per-epoch snapshot)."""

    def controls(self, address: str, public_key: bytes) -> bool:
        """``public_key`` is the key of the wallet at ``address``."""
        ...

    def stake_of(self, address: str, epoch: int) -> int | None:
        """nanoTON staked by ``address`` for ``epoch``; None when the snapshot is not known yet."""
        ...


class StakeTable:
    """A stake snapshot filled by the node from its chain backend (and by simulations directly)."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._stakes: dict[tuple[str, int], int] = {}

    def set_key(self, address: str, public_key: bytes) -> None:
        self._keys[address] = public_key

    def set_stake(self, address: str, epoch: int, amount: int) -> None:
        self._stakes[(address, epoch)] = amount

    def controls(self, address: str, public_key: bytes) -> bool:
        return self._keys.get(address) == public_key

    def stake_of(self, address: str, epoch: int) -> int | None:
        return self._stakes.get((address, epoch))


def check_candidacy(
    rec: SignedCandidacy,
    now: float,
    stakes: StakeOracle,
    *,
    min_stake: int,
    limits: MarketLimits | None = None,
    check_signature: SignatureCheck = signature_valid,
) -> Outcome:
    """Stateless checks of a candidacy: schema, identity, both signatures, times and stake.

    Unprovable stake (a key that does not control the address, or a claim above
    what the chain reports) is a REJECT; stake below ``min_stake`` is an IGNORE.
    Duplicates and epoch cut-offs are the candidacy pool's business.
    """
    limits = limits or MarketLimits()
    c = rec.body
    if len(c.candidate_key) != _KEY or len(c.stake_key) != _KEY:
        return _reject("bad key length")
    if len(rec.signature) != _SIG or len(rec.stake_signature) != _SIG:
        return _reject("bad signature length")
    if not c.operator or not c.stake_address or c.epoch < 0:
        return _reject("missing operator, stake address or epoch")
    if not 0 < c.stake_amount <= limits.max_stake:
        return _reject("absurd stake")
    timing = _check_times(c.issued_at, c.expires_at, now, limits, limits.max_candidacy_lifetime)
    if timing is not None and timing.decision is Decision.REJECT:
        return timing
    if not peer_id_matches(rec):
        return _reject("peer id does not match the key")
    if not check_signature(rec):
        return _reject("bad signature")
    if timing is not None:
        return timing
    if not stakes.controls(c.stake_address, c.stake_key):
        return _reject("stake key does not control the stake address")
    reported = stakes.stake_of(c.stake_address, c.epoch)
    if reported is None:
        return _ignore("no stake snapshot for the epoch yet")
    if c.stake_amount > reported:
        return _reject("stake claim above what the chain reports")
    if c.stake_amount < min_stake:
        return _ignore("stake below the minimum")
    return ACCEPT


def check_verdict(
    rec: SignedVerdict,
    now: float,
    *,
    limits: MarketLimits | None = None,
    check_signature: SignatureCheck = signature_valid,
) -> Outcome:
    """Stateless checks of an attestation verdict (whether its proxy is trusted is the caller's call)."""
    limits = limits or MarketLimits()
    v = rec.body
    if len(v.proxy_key) != _KEY or len(rec.signature) != _SIG or len(v.report_hash) != _HASH:
        return _reject("bad key, signature or hash length")
    if v.status not in ("ok", "rejected") or v.tier not in TIERS:
        return _reject("bad status or tier")
    timing = _check_times(v.verified_at, v.expires_at, now, limits, limits.max_verdict_lifetime)
    if timing is not None and timing.decision is Decision.REJECT:
        return timing
    if not peer_id_matches(rec):
        return _reject("peer id does not match the key")
    if not check_signature(rec):
        return _reject("bad signature")
    return timing or ACCEPT


def check_market_stats(
    rec: SignedMarketStats,
    now: float,
    *,
    limits: MarketLimits | None = None,
    check_signature: SignatureCheck = signature_valid,
) -> Outcome:
    """Stateless checks of a proxy's market statistics."""
    limits = limits or MarketLimits()
    s = rec.body
    if len(s.proxy_key) != _KEY or len(rec.signature) != _SIG:
        return _reject("bad key or signature length")
    prices = (s.prompt_median, s.completion_p10, s.completion_median, s.completion_p90)
    if not all(0 <= p <= limits.max_price for p in prices) or min(s.live_offers, s.capacity, s.fills) < 0:
        return _reject("absurd figures")
    if not _finite(s.at, s.window_s) or s.window_s <= 0:
        return _reject("bad time fields")
    if s.at > now + limits.max_skew:
        return _ignore("issued in the future")
    if s.at < now - limits.max_lifetime:
        return _ignore("expired")
    if not peer_id_matches(rec):
        return _reject("peer id does not match the key")
    if not check_signature(rec):
        return _reject("bad signature")
    return ACCEPT
