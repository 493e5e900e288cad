"""The market state of one node, the pure core the shell and the simulator drive.

- :class:`ProxyCore`: what an elected proxy keeps: the offer validator, the
  offer book with attestation verdicts and worker loads, reputation, fills; it
  answers match requests and produces market statistics.
- :class:`ElectionView`: what every node keeps to know the proxies: the
  candidacy pool and the elected sets (recomputed whenever the pool changes,
  so late candidacies converge instead of splitting the network).
- :func:`endorse`: turns the confidential-compute verifier's
  :class:`~market.verify.AttestationVerdict` into a signed market verdict.

Nothing here awaits or reads a clock: ``now`` and ``random.Random`` are passed in.
"""

from __future__ import annotations

import random

from overlay.identity import Identity

from .book import OfferBook, WorkerLoad
from .election import CandidacyPool, ElectedProxy, ElectionParams, EpochClock, EpochSeed, attach, elect
from .pricing import FillLog, market_stats
from .records import (
    ATTESTED_TIERS,
    TIERS,
    MarketStats,
    MatchRequest,
    MatchResponse,
    Offer,
    SignatureCheck,
    SignedCandidacy,
    SignedOffer,
    SignedVerdict,
    UsageReport,
    Verdict,
    WorkerHeartbeat,
    sign_verdict,
    signature_valid,
    tier_rank,
)
from .reputation import Reputation
from .validation import (
    Decision,
    MarketLimits,
    OfferValidator,
    Outcome,
    PeerScores,
    StakeOracle,
    check_candidacy,
    check_verdict,
)
from .verify import AttestationVerdict

__all__ = ["ElectionView", "ProxyCore", "endorse"]

_MAX_COUNT = 8


def endorse(
    identity: Identity, offer: Offer, verdict: AttestationVerdict, now: float, *, max_validity: float = 3600.0
) -> SignedVerdict:
    """Sign the proxy's verdict on an offer's attestation report.

    The verdict is ``ok`` only if the verifier accepted the report *and* the report
    belongs to this offer: same hash, same worker, same model, a tier at least the
    one the offer claims.  It expires with the verifier's verdict, at most
    ``max_validity`` seconds after ``now``.
    """
    problems = []
    if verdict.report_hash != offer.attestation_hash:
        problems.append("report_hash_mismatch")
    if verdict.peer_id != offer.peer_id:
        problems.append("wrong_peer")
    if verdict.model_hash != offer.model_hash:
        problems.append("wrong_model")
    if tier_rank(verdict.tier) < tier_rank(offer.tier):
        problems.append("tier_mismatch")
    ok = verdict.ok and not problems
    reason = "" if ok else (verdict.reason or problems[0])
    body = Verdict(
        proxy_key=identity.public_key,
        proxy_peer_id=identity.peer_id,
        worker_peer_id=offer.peer_id,
        report_hash=offer.attestation_hash,
        tier=offer.tier if ok else (verdict.tier if verdict.tier in TIERS else "none"),
        status="ok" if ok else "rejected",
        measurement=verdict.measurement[:64] if ok else b"",
        reason=reason[:128],
        verified_at=now,
        expires_at=max(now + 1.0, min(verdict.expires_at, now + max_validity)),
    )
    return sign_verdict(identity, body)


class ProxyCore:
    """An elected proxy's market state."""

    def __init__(
        self,
        *,
        limits: MarketLimits | None = None,
        book: OfferBook | None = None,
        reputation: Reputation | None = None,
        scores: PeerScores | None = None,
        fills: FillLog | None = None,
        check_signature: SignatureCheck = signature_valid,
        attested_tiers: bool = True,
        suspend_s: float = 60.0,  # s a worker that failed a client before any token stays out of matches
    ) -> None:
        self.limits = limits or MarketLimits()
        self.scores = scores or PeerScores()
        self.validator = OfferValidator(self.limits, self.scores, check_signature=check_signature)
        self.book = book or OfferBook()
        self.reputation = reputation or Reputation()
        self.fills = fills or FillLog()
        self.check_signature = check_signature
        #: False until a verifier is wired in: offers of attested tiers are then ignored.
        self.attested_tiers = attested_tiers
        self.suspend_s = suspend_s
        self._pending: dict[tuple[str, bytes], SignedOffer] = {}

    # ---- gossip input

    def receive_offer(self, rec: SignedOffer, now: float, source: str | None = None) -> Outcome:
        """Validate and insert a gossiped offer; the Outcome tells gossip whether to relay it."""
        o = rec.body
        if o.tier in ATTESTED_TIERS and not self.attested_tiers:
            return Outcome(Decision.IGNORE, "attested tiers need a verifier")
        outcome = self.validator.validate(rec, now, source)
        if not outcome.accepted:
            return outcome
        self.book.insert(rec, now)
        if o.tier in ATTESTED_TIERS and o.capacity > 0 and self.book.verdict_for(rec, now) is None:
            self._pending[(o.peer_id, o.attestation_hash)] = rec
        return outcome

    def receive_verdict(
        self, rec: SignedVerdict, now: float, source: str | None = None, *, trusted: bool
    ) -> Outcome:
        """Validate and keep a verdict; ``trusted`` says whether its proxy is in an active elected set."""
        outcome = check_verdict(rec, now, limits=self.limits, check_signature=self.check_signature)
        self.scores.record(source, outcome, now)
        if not outcome.accepted:
            return outcome
        if not trusted:
            return Outcome(Decision.IGNORE, "verdict from a proxy not elected")
        if not self.book.add_verdict(rec):
            return Outcome(Decision.IGNORE, "verdict already known")
        self._pending.pop((rec.body.worker_peer_id, rec.body.report_hash), None)
        return outcome

    def pending_verifications(self) -> list[SignedOffer]:
        """Offers of attested tiers that wait for this proxy to fetch and verify their report."""
        return list(self._pending.values())

    def verified(self, offer: SignedOffer) -> None:
        """The shell verified (or failed to verify) this offer's report: stop asking for it."""
        self._pending.pop((offer.body.peer_id, offer.body.attestation_hash), None)

    # ---- direct-stream input

    def heartbeat(self, peer_id: str, hb: WorkerHeartbeat, now: float) -> None:
        self.book.update_load(peer_id, WorkerLoad.from_heartbeat(hb, now))

    def usage(self, report: UsageReport, now: float) -> None:
        """A client's account of a session; a failure before any token also suspends the worker."""
        if not report.completed and report.tokens_received == 0:
            self.book.suspend(report.worker_peer_id, now + self.suspend_s)
        if report.completed:
            self.reputation.record_completed(report.worker_peer_id, now)
        else:
            self.reputation.record_failed(report.worker_peer_id, now)
        self.reputation.record_receipts(
            report.worker_peer_id, report.tokens_receipted, report.tokens_received, now
        )

    def match(self, req: MatchRequest, now: float, rng: random.Random) -> MatchResponse:
        """Answer a client's match request."""
        count = max(1, min(_MAX_COUNT, req.count))
        if tier_rank(req.min_tier) < 0:
            return MatchResponse(req.request_id, (), (), None, f"unknown tier {req.min_tier!r}")
        result = self.book.match(
            req.model_id,
            max_price_prompt=req.max_price_prompt,
            max_price_completion=req.max_price_completion,
            min_tier=req.min_tier,
            now=now,
            rng=rng,
            count=count,
            exclude=req.exclude,
            reputation=self.reputation.score,
        )
        if result.offers:
            self.fills.record(req.model_id, now)
            return MatchResponse(req.request_id, result.offers, result.verdicts, None, "")
        if result.price_hint is not None:
            reason = f"no offer under the cap; cheapest: {result.price_hint} nanoTON per completion token"
        else:
            reason = "no live offer for this model and tier"
        return MatchResponse(req.request_id, (), (), result.price_hint, reason)

    def stats(self, model_id: str, now: float, *, proxy_peer_id: str, proxy_key: bytes) -> MarketStats:
        return market_stats(
            self.book, self.fills, model_id, now, proxy_peer_id=proxy_peer_id, proxy_key=proxy_key
        )

    def tick(self, now: float) -> list[str]:
        """Expire offers, verdicts, stale loads and old replay state; returns workers dropped."""
        removed = self.book.expire(now)
        for key in [k for k, r in self._pending.items() if r.body.expires_at <= now]:
            del self._pending[key]
        self.validator.prune(now)
        return removed


class ElectionView:
    """Candidacies seen and the proxy sets they elect (every node keeps one)."""

    def __init__(
        self,
        clock: EpochClock,
        epoch_seed: EpochSeed,
        stakes: StakeOracle,
        *,
        params: ElectionParams | None = None,
        limits: MarketLimits | None = None,
        scores: PeerScores | None = None,
        check_signature: SignatureCheck = signature_valid,
    ) -> None:
        self.clock = clock
        self.epoch_seed = epoch_seed
        self.stakes = stakes
        self.params = params or ElectionParams()
        self.limits = limits or MarketLimits()
        self.scores = scores or PeerScores()
        self.check_signature = check_signature
        self.pool = CandidacyPool(clock)
        self._cache: dict[int, tuple[ElectedProxy, ...]] = {}

    def receive_candidacy(self, rec: SignedCandidacy, now: float, source: str | None = None) -> Outcome:
        outcome = check_candidacy(
            rec,
            now,
            self.stakes,
            min_stake=self.params.min_stake,
            limits=self.limits,
            check_signature=self.check_signature,
        )
        self.scores.record(source, outcome, now)
        if not outcome.accepted:
            return outcome
        if rec.body.epoch < self.clock.epoch_of(now) - 1:
            return Outcome(Decision.IGNORE, "candidacy for a past epoch")
        if not self.pool.add(rec):
            return Outcome(Decision.IGNORE, "duplicate or after the cut-off")
        self._cache.pop(rec.body.epoch, None)
        return outcome

    def proxies(self, epoch: int) -> tuple[ElectedProxy, ...]:
        """The elected set of ``epoch`` from the candidacies seen so far."""
        cached = self._cache.get(epoch)
        if cached is None:
            cached = elect(self.pool.candidacies(epoch), epoch, self.epoch_seed(epoch), self.params)
            self._cache[epoch] = cached
        return cached

    def active(self, now: float) -> list[ElectedProxy]:
        """Proxies usable at ``now``: the current epoch's, then (during the overlap) the previous one's."""
        seen: set[str] = set()
        out: list[ElectedProxy] = []
        for epoch in self.clock.active_epochs(now):
            for p in self.proxies(epoch):
                if p.peer_id not in seen:
                    seen.add(p.peer_id)
                    out.append(p)
        return out

    def is_active_proxy(self, peer_id: str, now: float) -> bool:
        return any(p.peer_id == peer_id for p in self.active(now))

    def attach(self, node_id: str, now: float, r: int = 3) -> list[str]:
        """The ``r`` proxies of the current epoch ``node_id`` should use, best first."""
        epoch = self.clock.epoch_of(now)
        return attach(node_id, self.proxies(epoch), epoch, r)

    def prune(self, now: float) -> None:
        before = self.clock.epoch_of(now) - 1
        self.pool.prune(before)
        for e in [e for e in self._cache if e < before]:
            del self._cache[e]
