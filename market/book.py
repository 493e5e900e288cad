"""The offer book and matching, the pure core.

Theory of operation
-------------------
The book holds at most one live offer per worker (the highest seqno), indexed
by model and, within a model, by confidentiality rank, each index a list kept
sorted by (completion price, peer id).  Offers with capacity 0 are
withdrawals: they remove the worker.  Expiry is lazy: :meth:`OfferBook.expire`
pops a heap of deadlines, and :meth:`OfferBook.match` skips anything expired,
so an expired offer is never returned even between sweeps.

Attestation verdicts (from proxies) are stored beside the offers; an offer of
an attested tier is matchable only while an unexpired ``ok`` verdict for its
report hash exists.

``match`` filters (model, both price caps, minimum tier, endorsement, not
excluded or suspended, not full according to a fresh heartbeat, unexpired),
walking the price index cheapest first, and scores each survivor (lower is
better)::

    score = w_price   * (price_prompt + price_completion) / (cap_prompt + cap_completion)
          + w_load    * L / (L + load_scale),      L = active x mean_duration (heartbeat)
          + w_latency * T / (T + latency_scale),   T = rtt + (queue_tokens + 100) / tok_s
          + w_rep     * (1 - reputation)

Unknown load and latency (no fresh heartbeat at this proxy) count as 0.5.
Workers a client reported unreachable are suspended for a while (they may have
crashed without withdrawing their offer).  The walk stops once the price term
alone cannot beat the current ``count``-th best, or after ``scan_limit``
candidates (price is the primary criterion), so a call costs
O(log n + scan_limit).  With probability ``exploration`` the first result is
instead an eligible offer drawn uniformly from those under the cap (from the
injected ``random.Random``), which gives newcomers traffic.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Callable, Iterator, Sequence

import attrs

from .records import (
    ATTESTED_TIERS,
    TIER_RANK,
    SignedOffer,
    SignedVerdict,
    WorkerHeartbeat,
    tier_rank,
)

__all__ = ["MatchResult", "OfferBook", "RankWeights", "WorkerLoad"]

_REF_TOKENS = 100  # tokens: the response length the latency estimate assumes


@attrs.frozen
class WorkerLoad:
    """A worker's load as its last heartbeat to this proxy reported it."""

    active: int
    max_active: int
    queue_tokens: int
    tok_s: float
    mean_duration: float  # s
    rtt_ms: float
    at: float  # s, when the proxy received it

    @classmethod
    def from_heartbeat(cls, hb: WorkerHeartbeat, now: float) -> WorkerLoad:
        return cls(hb.active, hb.max_active, hb.queue_tokens, hb.tok_s, hb.mean_duration, hb.rtt_ms, now)


@attrs.frozen
class RankWeights:
    price: float = 0.4
    load: float = 0.25
    latency: float = 0.2
    reputation: float = 0.15
    load_scale: float = 5.0  # s of queued work that scores 0.5
    latency_scale: float = 1.0  # s of estimated latency that scores 0.5


@attrs.frozen
class MatchResult:
    offers: tuple[SignedOffer, ...]  # best first
    verdicts: tuple[SignedVerdict, ...]  # for the offers of attested tiers
    price_hint: int | None  # when nothing matched: the cheapest completion price that would have
    explored: bool  # the first offer is an exploration pick


@attrs.define
class _Entry:
    offer: SignedOffer
    key: tuple[int, str]
    rank: int
    load: WorkerLoad | None = None


Reputation = Callable[[str, float], float]


def _prefix(keys: list[tuple[int, str]], n: int) -> Iterator[tuple[int, str]]:
    for i in range(n):
        yield keys[i]


def _neutral_reputation(peer_id: str, now: float) -> float:
    return 0.5


class OfferBook:
    """Live offers by model; see the module docstring for the ranking."""

    def __init__(
        self,
        *,
        weights: RankWeights | None = None,
        exploration: float = 0.15,  # probability of an exploration pick
        scan_limit: int = 256,  # candidates scored per match at most
        load_ttl: float = 10.0,  # s: heartbeats older than this are ignored
    ) -> None:
        if not 0.0 <= exploration <= 1.0:
            raise ValueError("exploration must be a probability")
        self.weights = weights or RankWeights()
        self.exploration = exploration
        self.scan_limit = scan_limit
        self.load_ttl = load_ttl
        self._entries: dict[str, _Entry] = {}
        self._index: dict[str, dict[int, list[tuple[int, str]]]] = {}  # model -> rank -> sorted keys
        self._deadlines: list[tuple[float, str, int]] = []  # (expires_at, peer_id, seqno)
        self._verdicts: dict[tuple[str, bytes], SignedVerdict] = {}
        self._loads: dict[str, WorkerLoad] = {}
        self._suspended: dict[str, float] = {}  # peer id -> until (s)

    # ---- offers

    def insert(self, rec: SignedOffer, now: float) -> bool:
        """Add or replace the worker's offer; a lower seqno or an expired offer changes nothing.

        Feed only offers that passed :class:`market.validation.OfferValidator`.
        A capacity of 0 withdraws the worker.  Returns whether the book changed.
        """
        o = rec.body
        if o.expires_at <= now:
            return False
        old = self._entries.get(o.peer_id)
        if old is not None:
            if old.offer.body.seqno >= o.seqno:
                return False
            self._unindex(old)
        if o.capacity == 0:
            return old is not None
        entry = _Entry(rec, (o.price_completion, o.peer_id), tier_rank(o.tier), self._loads.get(o.peer_id))
        self._entries[o.peer_id] = entry
        lists = self._index.setdefault(o.model_id, {})
        bisect.insort(lists.setdefault(entry.rank, []), entry.key)
        heapq.heappush(self._deadlines, (o.expires_at, o.peer_id, o.seqno))
        return True

    def _unindex(self, entry: _Entry) -> None:
        o = entry.offer.body
        del self._entries[o.peer_id]
        lists = self._index[o.model_id]
        keys = lists[entry.rank]
        i = bisect.bisect_left(keys, entry.key)
        del keys[i]
        if not keys:
            del lists[entry.rank]
            if not lists:
                del self._index[o.model_id]

    def remove(self, peer_id: str) -> bool:
        entry = self._entries.get(peer_id)
        if entry is None:
            return False
        self._unindex(entry)
        return True

    def expire(self, now: float) -> list[str]:
        """Drop offers whose expiry passed; returns the workers removed."""
        removed: list[str] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, peer_id, seqno = heapq.heappop(self._deadlines)
            entry = self._entries.get(peer_id)
            if entry is not None and entry.offer.body.seqno == seqno:
                self._unindex(entry)
                removed.append(peer_id)
        for key in [k for k, v in self._verdicts.items() if v.body.expires_at <= now]:
            del self._verdicts[key]
        for peer in [p for p, until in self._suspended.items() if until <= now]:
            del self._suspended[peer]
        for peer in [p for p, load in self._loads.items() if now - load.at > self.load_ttl]:
            del self._loads[peer]
            entry = self._entries.get(peer)
            if entry is not None:
                entry.load = None
        return removed

    def get(self, peer_id: str) -> SignedOffer | None:
        entry = self._entries.get(peer_id)
        return None if entry is None else entry.offer

    def offers(self, model_id: str, now: float) -> list[SignedOffer]:
        """Live offers for a model, cheapest completion price first."""
        lists = self._index.get(model_id, {})
        out = [self._entries[pid].offer for _, pid in heapq.merge(*lists.values())]
        return [r for r in out if r.body.expires_at > now]

    def models(self) -> list[str]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    # ---- verdicts and load

    def add_verdict(self, rec: SignedVerdict) -> bool:
        """Keep a validated verdict from a trusted proxy; the newest per (worker, report) wins."""
        v = rec.body
        key = (v.worker_peer_id, v.report_hash)
        old = self._verdicts.get(key)
        if old is not None and old.body.verified_at >= v.verified_at:
            return False
        self._verdicts[key] = rec
        return True

    def verdict(self, worker_peer_id: str, report_hash: bytes) -> SignedVerdict | None:
        """The newest verdict kept on a worker's report, whatever its status."""
        return self._verdicts.get((worker_peer_id, report_hash))

    def verdict_for(self, rec: SignedOffer, now: float) -> SignedVerdict | None:
        """The ``ok`` verdict that endorses an offer of an attested tier, if any."""
        o = rec.body
        v = self._verdicts.get((o.peer_id, o.attestation_hash))
        if v is None or v.body.status != "ok" or v.body.expires_at <= now:
            return None
        if tier_rank(v.body.tier) < tier_rank(o.tier):
            return None
        return v

    def update_load(self, peer_id: str, load: WorkerLoad) -> None:
        self._loads[peer_id] = load
        entry = self._entries.get(peer_id)
        if entry is not None:
            entry.load = load

    def load_of(self, peer_id: str) -> WorkerLoad | None:
        return self._loads.get(peer_id)

    def suspend(self, peer_id: str, until: float) -> None:
        """Leave the worker out of matches until ``until`` (it failed a client; it may be gone)."""
        self._suspended[peer_id] = max(until, self._suspended.get(peer_id, until))

    def suspended(self, peer_id: str, now: float) -> bool:
        return self._suspended.get(peer_id, now) > now

    # ---- matching

    def _walk(self, model_id: str, min_rank: int, max_completion: int) -> Iterator[tuple[int, str]]:
        """Index keys of a model with rank >= min_rank and completion price <= the cap, cheapest first."""
        lists = self._index.get(model_id)
        if not lists:
            return iter(())
        bound = (max_completion, "\U0010ffff")
        prefixes = [
            _prefix(keys, bisect.bisect_right(keys, bound))
            for rank, keys in lists.items()
            if rank >= min_rank
        ]
        return prefixes[0] if len(prefixes) == 1 else heapq.merge(*prefixes)

    def _eligible(
        self,
        entry: _Entry,
        now: float,
        max_prompt: int,
        exclude: frozenset[str],
    ) -> bool:
        o = entry.offer.body
        if o.expires_at <= now or o.price_prompt > max_prompt or o.peer_id in exclude:
            return False
        if self._suspended and self._suspended.get(o.peer_id, now) > now:
            return False
        load = entry.load
        if load is not None and now - load.at <= self.load_ttl and load.active >= load.max_active:
            return False
        return o.tier not in ATTESTED_TIERS or self.verdict_for(entry.offer, now) is not None

    def _score(self, entry: _Entry, now: float, cap_sum: int, reputation: Reputation) -> float:
        w = self.weights
        o = entry.offer.body
        score = w.price * (o.price_prompt + o.price_completion) / cap_sum
        load = entry.load
        if load is not None and now - load.at <= self.load_ttl:
            busy = load.active * max(load.mean_duration, 0.0)
            tok_s = load.tok_s if load.tok_s > 0 else o.decode_tok_s
            latency = load.rtt_ms / 1000 + (load.queue_tokens + _REF_TOKENS) / tok_s
            score += w.load * busy / (busy + w.load_scale)
            score += w.latency * latency / (latency + w.latency_scale)
        else:
            score += (w.load + w.latency) * 0.5
        return score + w.reputation * (1.0 - reputation(o.peer_id, now))

    def match(
        self,
        model_id: str,
        *,
        max_price_prompt: int,
        max_price_completion: int,
        min_tier: str,
        now: float,
        rng: random.Random,
        count: int = 3,
        exclude: Sequence[str] = (),
        reputation: Reputation = _neutral_reputation,
    ) -> MatchResult:
        """The best ``count`` eligible offers for a model under both price caps, best first."""
        min_rank = TIER_RANK.get(min_tier)
        if min_rank is None or count <= 0:
            return MatchResult((), (), None, False)
        excluded = frozenset(exclude)
        cap_sum = max(1, max_price_prompt + max_price_completion)
        w_price = self.weights.price
        best: list[tuple[float, str]] = []  # heap of (-score, peer_id): best[0] is the worst kept
        scanned = visited = 0
        for price_c, peer_id in self._walk(model_id, min_rank, max_price_completion):
            if len(best) >= count and w_price * price_c / cap_sum >= -best[0][0]:
                break
            if scanned >= self.scan_limit or visited >= 8 * self.scan_limit:
                break
            visited += 1
            entry = self._entries[peer_id]
            if not self._eligible(entry, now, max_price_prompt, excluded):
                continue
            scanned += 1
            item = (-self._score(entry, now, cap_sum, reputation), peer_id)
            if len(best) < count:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
        ranked = [peer for _, peer in sorted(best, key=lambda t: (-t[0], t[1]))]
        explored = False
        if ranked and self.exploration > 0 and rng.random() < self.exploration:
            pick = self._explore(
                model_id, min_rank, max_price_prompt, max_price_completion, now, rng, excluded
            )
            if pick is not None:
                explored = True
                ranked = [pick, *[p for p in ranked if p != pick][: count - 1]]
        if not ranked:
            hint = self._price_hint(model_id, min_rank, max_price_prompt, now, excluded)
            return MatchResult((), (), hint, False)
        offers = tuple(self._entries[p].offer for p in ranked)
        verdicts = tuple(v for v in (self.verdict_for(r, now) for r in offers) if v is not None)
        return MatchResult(offers, verdicts, None, explored)

    def _explore(
        self,
        model_id: str,
        min_rank: int,
        max_prompt: int,
        max_completion: int,
        now: float,
        rng: random.Random,
        excluded: frozenset[str],
        tries: int = 16,
    ) -> str | None:
        lists = self._index.get(model_id, {})
        prefixes = []
        for rank, keys in lists.items():
            if rank >= min_rank:
                n = bisect.bisect_right(keys, (max_completion, "\U0010ffff"))
                if n:
                    prefixes.append((keys, n))
        total = sum(n for _, n in prefixes)
        for _ in range(tries if total else 0):
            i = rng.randrange(total)
            for keys, n in prefixes:
                if i < n:
                    entry = self._entries[keys[i][1]]
                    if self._eligible(entry, now, max_prompt, excluded):
                        return entry.offer.body.peer_id
                    break
                i -= n
        return None

    def _price_hint(
        self, model_id: str, min_rank: int, max_prompt: int, now: float, excluded: frozenset[str]
    ) -> int | None:
        """The cheapest completion price among offers that fail only the completion price cap."""
        for scanned, (price_c, peer_id) in enumerate(self._walk(model_id, min_rank, 2**63)):
            if scanned >= self.scan_limit:
                break
            if self._eligible(self._entries[peer_id], now, max_prompt, excluded):
                return price_c
        return None
