"""Prices that move with supply and demand, the pure cores.

- :class:`PricingPolicy`: a worker's price is a floor times a multiplier that
  rises with its load (utilisation squared, so it stays near the floor until the
  worker gets busy) and with its queue::

      multiplier = min(max_multiplier, 1 + load_factor * (active / capacity)^2
                                         + queue_factor * queue_tokens / queue_ref)

- :class:`OfferPublisher`: the worker's offer schedule.  :meth:`~OfferPublisher.tick`
  returns a fresh offer body to sign and gossip when the current one is due for
  renewal (every ``refresh`` seconds, lifetime ``lifetime``), or when the price
  moved by more than ``step`` (relative) — but never twice within
  ``min_interval`` (validators ignore faster re-publishing).  Seqnos are
  millisecond timestamps, strictly increasing, so they survive restarts.
- :class:`FillLog` and :func:`market_stats`: the per-model statistics a proxy
  publishes (live offers, capacity, median and p10/p90 prices, recent fills).
"""

from __future__ import annotations

import math
from collections import deque

import attrs

from .book import OfferBook
from .records import MarketStats, Offer

__all__ = ["FillLog", "OfferPublisher", "PricingPolicy", "WorkerProfile", "market_stats", "percentile"]


@attrs.frozen
class PricingPolicy:
    floor_prompt: int  # nanoTON per prompt token at zero load
    floor_completion: int  # nanoTON per completion token at zero load
    load_factor: float = 1.0  # multiplier added at full utilisation
    queue_factor: float = 0.5  # multiplier added per queue_ref tokens queued
    queue_ref: int = 4096  # tokens
    max_multiplier: float = 4.0
    step: float = 0.05  # relative price move that triggers a re-publish

    def multiplier(self, active: int, capacity: int, queue_tokens: int) -> float:
        util = min(1.0, max(0, active) / capacity) if capacity > 0 else 1.0
        m = 1.0 + self.load_factor * util * util + self.queue_factor * max(0, queue_tokens) / self.queue_ref
        return min(self.max_multiplier, m)

    def prices(self, active: int, capacity: int, queue_tokens: int) -> tuple[int, int]:
        """(prompt, completion) prices in nanoTON per token for this load."""
        m = self.multiplier(active, capacity, queue_tokens)
        return round(self.floor_prompt * m), round(self.floor_completion * m)

    def moved(self, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """Whether either price moved by more than ``step`` relative to the old one."""
        return any(abs(n - o) > self.step * max(o, 1) for o, n in zip(old, new, strict=True))


@attrs.frozen
class WorkerProfile:
    """What a worker offers besides the price."""

    peer_id: str
    worker_key: bytes
    addrs: tuple[str, ...]
    model_id: str
    model_hash: bytes
    capacity: int
    max_context: int
    decode_tok_s: float
    tier: str = "none"
    attestation_hash: bytes = b""
    engine: str = ""  # the inference engine (cpu | cuda | exllamav2 | exllamav3), named in the offer


class OfferPublisher:
    """When a worker must (re-)publish its offer, and with what body."""

    def __init__(
        self,
        profile: WorkerProfile,
        policy: PricingPolicy,
        *,
        refresh: float = 120.0,  # s between routine re-publishes
        lifetime: float = 600.0,  # s an offer stays valid
        min_interval: float = 10.0,  # s: validators ignore offers closer than this
    ) -> None:
        self.profile = profile
        self.policy = policy
        self.refresh = refresh
        self.lifetime = lifetime
        self.min_interval = min_interval
        self.current: Offer | None = None
        self._seqno = -1
        self._last_issued = -math.inf  # s: issue time of the last body, withdrawals included
        self.withdrawn = False

    def _next_seqno(self, now: float) -> int:
        self._seqno = max(self._seqno + 1, int(now * 1000))
        return self._seqno

    def _issued(self, now: float) -> float:
        self._last_issued = now
        return now

    def _body(self, now: float, prices: tuple[int, int], capacity: int) -> Offer:
        p = self.profile
        return Offer(
            worker_key=p.worker_key,
            peer_id=p.peer_id,
            addrs=p.addrs,
            model_id=p.model_id,
            model_hash=p.model_hash,
            price_prompt=prices[0],
            price_completion=prices[1],
            capacity=capacity,
            max_context=p.max_context,
            decode_tok_s=p.decode_tok_s,
            tier=p.tier,
            attestation_hash=p.attestation_hash,
            seqno=self._next_seqno(now),
            issued_at=self._issued(now),
            expires_at=now + self.lifetime,
            engine=p.engine,
        )

    def tick(self, now: float, *, active: int = 0, queue_tokens: int = 0) -> Offer | None:
        """A new offer body to sign and publish now, or None if the current one still stands."""
        if self.withdrawn or now - self._last_issued < self.min_interval:
            return None
        prices = self.policy.prices(active, self.profile.capacity, queue_tokens)
        cur = self.current
        if cur is not None:
            age = now - cur.issued_at
            moved = self.policy.moved((cur.price_prompt, cur.price_completion), prices)
            if age < self.refresh and not moved:
                return None
        self.current = self._body(now, prices, self.profile.capacity)
        return self.current

    def update_profile(self, profile: WorkerProfile) -> None:
        """A new profile (a rotated attestation report): the next tick publishes at once."""
        self.profile = profile
        self.current = None

    def withdraw(self, now: float) -> Offer:
        """A capacity-0 offer with a higher seqno: proxies drop the worker at once."""
        self.withdrawn = True
        cur = self.current
        prices = (0, 0) if cur is None else (cur.price_prompt, cur.price_completion)
        self.current = self._body(now, prices, 0)
        return self.current

    def resume(self) -> None:
        """Publish again (the next tick, once ``min_interval`` has passed since the withdrawal)."""
        self.withdrawn = False
        self.current = None


class FillLog:
    """Match fills per model over a sliding window."""

    def __init__(self, window: float = 600.0) -> None:  # s
        self.window = window
        self._fills: dict[str, deque[float]] = {}

    def record(self, model_id: str, now: float) -> None:
        self._fills.setdefault(model_id, deque()).append(now)

    def count(self, model_id: str, now: float) -> int:
        q = self._fills.get(model_id)
        if q is None:
            return 0
        while q and q[0] <= now - self.window:
            q.popleft()
        return len(q)


def percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank ``q`` percentile (0..1) of an ascending list; 0 when empty."""
    if not sorted_values:
        return 0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def market_stats(
    book: OfferBook,
    fills: FillLog,
    model_id: str,
    now: float,
    *,
    proxy_peer_id: str,
    proxy_key: bytes,
) -> MarketStats:
    """The statistics body a proxy signs and publishes for one model."""
    offers = [r.body for r in book.offers(model_id, now)]
    completion = sorted(o.price_completion for o in offers)
    prompt = sorted(o.price_prompt for o in offers)
    return MarketStats(
        proxy_key=proxy_key,
        proxy_peer_id=proxy_peer_id,
        model_id=model_id,
        live_offers=len(offers),
        capacity=sum(o.capacity for o in offers),
        prompt_median=percentile(prompt, 0.5),
        completion_p10=percentile(completion, 0.1),
        completion_median=percentile(completion, 0.5),
        completion_p90=percentile(completion, 0.9),
        fills=fills.count(model_id, now),
        window_s=fills.window,
        at=now,
    )
