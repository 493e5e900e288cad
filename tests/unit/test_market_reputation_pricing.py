"""Reputation decay, the pricing policy, the re-publish schedule and market statistics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.book import OfferBook
from market.pricing import FillLog, OfferPublisher, PricingPolicy, WorkerProfile, market_stats, percentile
from market.records import sign_offer
from market.reputation import Reputation
from market.testing import MODEL_HASH, make_offer, seeded_identity
from market.validation import OfferValidator

W = seeded_identity(0, "worker")


def test_reputation_rewards_success_and_honest_receipts() -> None:
    rep = Reputation(half_life=3600)
    assert rep.score("new", 0.0) == 0.5
    for _ in range(20):
        rep.record_completed("good", 0.0)
        rep.record_receipts("good", 100, 100, 0.0)
        rep.record_failed("flaky", 0.0)
        rep.record_receipts("liar", 200, 100, 0.0)
        rep.record_completed("liar", 0.0)
    assert rep.score("good", 0.0) > 0.9
    assert rep.score("flaky", 0.0) < 0.1
    assert rep.score("liar", 0.0) < rep.score("good", 0.0) * 0.6


def test_reputation_decays_back_towards_the_prior() -> None:
    rep = Reputation(half_life=100)
    for _ in range(50):
        rep.record_failed("w", 0.0)
    bad = rep.score("w", 0.0)
    assert rep.score("w", 1000.0) > bad
    assert rep.score("w", 1000.0) == pytest.approx(0.5, abs=0.03)
    # A reformed worker recovers after fresh successes.
    for _ in range(10):
        rep.record_completed("w", 1000.0)
    assert rep.score("w", 1000.0) > 0.8
    assert rep.prune(10**6) == 1
    assert len(rep) == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["ok", "fail", "receipt"]), st.integers(0, 10**6), st.integers(0, 10**6))
    )
)
def test_reputation_stays_in_unit_interval(events: list[tuple[str, int, int]]) -> None:
    rep = Reputation(half_life=60)
    now = 0.0
    for kind, a, b in events:
        now += a % 97
        if kind == "ok":
            rep.record_completed("w", now)
        elif kind == "fail":
            rep.record_failed("w", now)
        else:
            rep.record_receipts("w", a, b, now)
        assert 0.0 <= rep.score("w", now) <= 1.0


def test_pricing_multiplier_rises_with_load_and_queue() -> None:
    policy = PricingPolicy(floor_prompt=100, floor_completion=400)
    assert policy.prices(0, 8, 0) == (100, 400)
    half = policy.prices(4, 8, 0)
    full = policy.prices(8, 8, 0)
    queued = policy.prices(8, 8, 8192)
    assert (100, 400) < half < full < queued
    assert policy.prices(8, 8, 10**9) == (400, 1600)  # capped at max_multiplier
    assert policy.moved((100, 400), (100, 421))
    assert not policy.moved((100, 400), (104, 419))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 64), st.integers(0, 64), st.integers(0, 10**6), st.integers(0, 64), st.integers(0, 10**6)
)
def test_price_is_monotonic_in_load(a1: int, cap: int, q1: int, da: int, dq: int) -> None:
    policy = PricingPolicy(floor_prompt=7, floor_completion=1000)
    cap = max(cap, 1)
    assert policy.prices(a1, cap, q1) <= policy.prices(a1 + da, cap, q1 + dq)
    assert policy.prices(a1, cap, q1)[1] >= 1000


def profile() -> WorkerProfile:
    return WorkerProfile(W.peer_id, W.public_key, ("/ip4/1.2.3.4/tcp/1",), "tiny", MODEL_HASH, 8, 2048, 50.0)


def test_publisher_refreshes_and_reprices_within_the_rate_limit() -> None:
    pub = OfferPublisher(profile(), PricingPolicy(100, 400), refresh=120, lifetime=600, min_interval=10)
    first = pub.tick(1000.0)
    assert first is not None
    assert (first.price_prompt, first.price_completion, first.expires_at) == (100, 400, 1600.0)
    assert pub.tick(1050.0) is None  # not due, price unchanged
    assert pub.tick(1005.0, active=8) is None  # price moved but within min_interval
    moved = pub.tick(1011.0, active=8)
    assert moved is not None
    assert moved.price_completion == 800
    assert moved.seqno > first.seqno
    again = pub.tick(1011.0 + 120, active=8)
    assert again is not None  # routine refresh
    gone = pub.withdraw(1140.0)
    assert gone.capacity == 0
    assert gone.seqno > again.seqno
    assert pub.tick(2000.0) is None
    pub.resume()
    assert pub.tick(2000.0) is not None


def test_publisher_output_passes_validation_over_time() -> None:
    pub = OfferPublisher(profile(), PricingPolicy(100, 400))
    v = OfferValidator()
    accepted = 0
    for step in range(400):
        now = 10_000.0 + step * 3.0
        body = pub.tick(now, active=(step // 7) % 9, queue_tokens=(step * 131) % 9000)
        if body is not None:
            assert v.validate(sign_offer(W, body), now).accepted
            accepted += 1
    assert accepted >= 10


def test_market_stats_and_percentiles() -> None:
    assert percentile([], 0.5) == 0
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.1) == 2
    book = OfferBook()
    for i in range(10):
        book.insert(make_offer(seeded_identity(i, "worker"), now=0.0, price_completion=100 * (i + 1)), 0.0)
    fills = FillLog(window=60)
    for t in (1.0, 30.0, 59.0):
        fills.record("tiny", t)
    s = market_stats(book, fills, "tiny", 70.0, proxy_peer_id="p", proxy_key=b"k" * 32)
    assert (s.live_offers, s.capacity) == (10, 40)
    assert (s.completion_p10, s.completion_median, s.completion_p90) == (200, 500, 900)
    assert s.fills == 2
    assert fills.count("other", 70.0) == 0
