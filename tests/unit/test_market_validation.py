"""Validation of offers, candidacies, verdicts and statistics: REJECT vs IGNORE vs ACCEPT."""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.records import (
    MarketStats,
    SignedOffer,
    Verdict,
    sign_market_stats,
    sign_offer,
    sign_verdict,
)
from market.testing import make_candidacy, make_offer, offer_body, seeded_identity, ton_address
from market.validation import (
    Decision,
    MarketLimits,
    OfferValidator,
    PeerScores,
    StakeTable,
    check_candidacy,
    check_market_stats,
    check_verdict,
)
from overlay import wire

W = seeded_identity(10)
EVIL = seeded_identity(11)
PROXY = seeded_identity(12)


def validator() -> OfferValidator:
    return OfferValidator(MarketLimits(), PeerScores())


def test_valid_offer_is_accepted() -> None:
    v = validator()
    assert v.validate(make_offer(W, now=100.0, seqno=1), 100.0, "relay").decision is Decision.ACCEPT
    assert v.last_seqno(W.peer_id) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"price_completion": 10**12 + 1}, "absurd price"),
        ({"price_prompt": -1}, "absurd price"),
        ({"capacity": 100_000}, "absurd capacity"),
        ({"capacity": -1}, "absurd capacity"),
        ({"max_context": 0}, "absurd context length"),
        ({"decode_tok_s": 2e6}, "absurd decode speed"),
        ({"decode_tok_s": 0.0}, "absurd decode speed"),
        ({"tier": "sgx-maybe"}, "unknown tier"),
        ({"tier": "tdx"}, "attested tier without a report hash"),
        ({"attestation_hash": b"h" * 31}, "bad report hash"),
        ({"model_hash": b"short"}, "bad model id or hash"),
        ({"seqno": -5}, "negative seqno"),
        ({"expires_at": 50.0}, "bad validity window"),
        ({"expires_at": 100.0 + 901.0}, "lifetime over the limit"),
    ],
)
def test_absurd_offers_are_rejected_and_cost_the_sender(change: dict[str, object], reason: str) -> None:
    v = validator()
    body = attrs.evolve(offer_body(W, now=100.0), **change)
    out = v.validate(sign_offer(W, body), 100.0, "relay")
    assert out.decision is Decision.REJECT
    assert reason in out.reason
    assert v.scores.score("relay", 100.0) < 0
    assert v.last_seqno(W.peer_id) is None


def test_forged_signature_is_rejected() -> None:
    v = validator()
    body = offer_body(W, now=100.0)
    forged = SignedOffer(body=body, signature=EVIL.sign(wire.encode(body)))
    out = v.validate(forged, 100.0, "relay")
    assert (out.decision, out.reason) == (Decision.REJECT, "bad signature")
    assert v.last_seqno(W.peer_id) is None


def test_offer_for_another_peer_id_is_rejected() -> None:
    v = validator()
    body = attrs.evolve(offer_body(EVIL, now=100.0), peer_id=W.peer_id)
    out = v.validate(sign_offer(EVIL, body), 100.0, "relay")
    assert (out.decision, out.reason) == (Decision.REJECT, "peer id does not match the key")


def test_untimely_offers_are_ignored_without_penalty() -> None:
    v = validator()
    assert v.validate(make_offer(W, now=0.0, lifetime=60), 61.0, "r").reason == "expired"
    assert v.validate(make_offer(W, now=131.0), 100.0, "r").reason == "issued in the future"
    assert v.validate(make_offer(W, now=129.0), 100.0, "r").decision is Decision.ACCEPT  # 29 s skew is fine
    assert v.scores.score("r", 100.0) == 0.0


def test_stale_replayed_and_flooding_offers_are_ignored() -> None:
    v = validator()
    first = make_offer(W, now=100.0, seqno=5)
    assert v.validate(first, 100.0).accepted
    assert v.validate(first, 100.5).reason == "stale or replayed seqno"
    assert v.validate(make_offer(W, now=100.0, seqno=4), 101.0).reason == "stale or replayed seqno"
    assert v.validate(make_offer(W, now=105.0, seqno=6), 105.0).reason == "more than one offer per interval"
    assert v.validate(make_offer(W, now=110.0, seqno=7), 110.0).accepted
    # An earlier issue time with a higher seqno is a replay of an old signing, not news.
    assert v.validate(make_offer(W, now=90.0, seqno=99), 130.0).reason == "stale or replayed seqno"


def test_withdrawal_is_not_rate_limited_but_only_once() -> None:
    v = validator()
    assert v.validate(make_offer(W, now=100.0, seqno=1), 100.0).accepted
    assert v.validate(make_offer(W, now=101.0, seqno=2, capacity=0), 101.0).accepted
    assert v.validate(make_offer(W, now=102.0, seqno=3, capacity=0), 102.0).reason == (
        "more than one offer per interval"
    )


def test_replay_after_state_is_pruned_is_expired() -> None:
    v = validator()
    rec = make_offer(W, now=100.0, seqno=1, lifetime=600)
    assert v.validate(rec, 100.0).accepted
    assert v.prune(650.0) == 0  # still live: kept
    assert v.prune(100.0 + 600 + 31) == 1
    assert v.validate(rec, 100.0 + 600 + 31).reason == "expired"


def test_peer_scores_decay_and_graylist() -> None:
    s = PeerScores(reject_penalty=10, graylist_below=-25, half_life=60)
    for _ in range(3):
        s.penalize("p", 0.0)
    assert s.graylisted("p", 0.0)
    assert not s.graylisted("p", 60.0)  # halved to -15
    assert s.score("p", 60.0) == pytest.approx(-15.0)
    s.prune(10_000.0)
    assert len(s) == 0


# ----------------------------------------------------------------------------- candidacies


def test_candidacy_with_provable_stake_is_accepted() -> None:
    stakes = StakeTable()
    c = make_candidacy(W, seeded_identity(10, "stake"), epoch=5, now=10.0, stakes=stakes, amount=500)
    assert check_candidacy(c, 10.0, stakes, min_stake=100).accepted


def test_candidacy_with_unprovable_stake_is_rejected() -> None:
    stakes = StakeTable()
    stake = seeded_identity(10, "stake")
    c = make_candidacy(W, stake, epoch=5, now=10.0, stakes=stakes, amount=500)
    # The chain says this address belongs to another key.
    stakes.set_key(ton_address(stake.public_key), EVIL.public_key)
    assert (
        check_candidacy(c, 10.0, stakes, min_stake=1).reason == "stake key does not control the stake address"
    )


def test_candidacy_claiming_more_than_the_chain_reports_is_rejected() -> None:
    stakes = StakeTable()
    c = make_candidacy(
        W, seeded_identity(10, "stake"), epoch=5, now=10.0, stakes=stakes, amount=500, report_stake=499
    )
    assert check_candidacy(c, 10.0, stakes, min_stake=1).reason == "stake claim above what the chain reports"


def test_candidacy_without_snapshot_or_below_minimum_is_ignored() -> None:
    stakes = StakeTable()
    c = make_candidacy(W, seeded_identity(10, "stake"), epoch=5, now=10.0, stakes=stakes, amount=50)
    assert check_candidacy(c, 10.0, stakes, min_stake=100).reason == "stake below the minimum"
    other = make_candidacy(W, seeded_identity(10, "stake"), epoch=6, now=10.0, amount=50)
    assert check_candidacy(other, 10.0, stakes, min_stake=1).decision is Decision.IGNORE


def test_candidacy_forged_by_stake_key_holder_or_candidate_is_rejected() -> None:
    stakes = StakeTable()
    stake = seeded_identity(10, "stake")
    c = make_candidacy(W, stake, epoch=5, now=10.0, stakes=stakes)
    no_stake_sig = attrs.evolve(c, stake_signature=W.sign(wire.encode(c.body)))
    assert check_candidacy(no_stake_sig, 10.0, stakes, min_stake=1).reason == "bad signature"
    no_candidate_sig = attrs.evolve(c, signature=stake.sign(wire.encode(c.body)))
    assert check_candidacy(no_candidate_sig, 10.0, stakes, min_stake=1).reason == "bad signature"
    absurd = make_candidacy(W, stake, epoch=5, now=10.0, amount=10**19 + 1)
    assert check_candidacy(absurd, 10.0, stakes, min_stake=1).reason == "absurd stake"
    future = make_candidacy(W, stake, epoch=5, now=100.0, stakes=stakes)
    assert check_candidacy(future, 10.0, stakes, min_stake=1).reason == "issued in the future"


# ----------------------------------------------------------------------------- verdicts, stats


def verdict(**change: object) -> Verdict:
    body = Verdict(
        proxy_key=PROXY.public_key,
        proxy_peer_id=PROXY.peer_id,
        worker_peer_id=W.peer_id,
        report_hash=b"r" * 32,
        tier="tdx",
        status="ok",
        measurement=b"m" * 48,
        reason="",
        verified_at=100.0,
        expires_at=400.0,
    )
    return attrs.evolve(body, **change)


def test_verdict_checks() -> None:
    assert check_verdict(sign_verdict(PROXY, verdict()), 100.0).accepted
    assert check_verdict(sign_verdict(PROXY, verdict(status="maybe")), 100.0).decision is Decision.REJECT
    assert check_verdict(sign_verdict(EVIL, verdict()), 100.0).reason == "bad signature"
    assert check_verdict(sign_verdict(PROXY, verdict()), 500.0).reason == "expired"
    wrong = sign_verdict(EVIL, verdict(proxy_key=EVIL.public_key))
    assert check_verdict(wrong, 100.0).reason == "peer id does not match the key"


def stats(**change: object) -> MarketStats:
    body = MarketStats(
        proxy_key=PROXY.public_key,
        proxy_peer_id=PROXY.peer_id,
        model_id="tiny",
        live_offers=3,
        capacity=12,
        prompt_median=100,
        completion_p10=300,
        completion_median=400,
        completion_p90=500,
        fills=7,
        window_s=600.0,
        at=100.0,
    )
    return attrs.evolve(body, **change)


def test_market_stats_checks() -> None:
    assert check_market_stats(sign_market_stats(PROXY, stats()), 100.0).accepted
    assert check_market_stats(sign_market_stats(PROXY, stats(fills=-1)), 100.0).decision is Decision.REJECT
    assert check_market_stats(sign_market_stats(PROXY, stats(at=200.0)), 100.0).decision is Decision.IGNORE
    assert check_market_stats(sign_market_stats(EVIL, stats()), 100.0).reason == "bad signature"


# ----------------------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None)
@given(
    seqnos=st.lists(st.integers(0, 50), min_size=1, max_size=25),
    gaps=st.lists(st.floats(0, 30, allow_nan=False), min_size=25, max_size=25),
)
def test_accepted_seqnos_strictly_increase_and_respect_the_interval(
    seqnos: list[int], gaps: list[float]
) -> None:
    v = validator()
    now = 1000.0
    accepted: list[tuple[int, float, int]] = []
    for seqno, gap in zip(seqnos, gaps, strict=False):
        now += gap
        rec = make_offer(W, now=now, seqno=seqno)
        if v.validate(rec, now).accepted:
            accepted.append((seqno, now, rec.body.capacity))
    assert [s for s, _, _ in accepted] == sorted({s for s, _, _ in accepted})
    times = [t for _, t, _ in accepted]
    assert all(b - a >= 10.0 for a, b in itertools.pairwise(times))


def test_rate_limit_uses_signed_issue_times_so_jitter_does_not_drop_updates() -> None:
    v = validator()
    assert v.validate(make_offer(W, now=100.0, seqno=1), 100.08).accepted  # arrived late
    assert v.validate(make_offer(W, now=110.0, seqno=2), 110.01).accepted  # arrived early: still 10 s apart


def test_a_worker_cannot_burst_past_the_skew_allowance() -> None:
    v = validator()
    accepted = sum(
        v.validate(make_offer(W, now=100.0 + 10 * i, seqno=i + 1), 100.0).accepted for i in range(20)
    )
    assert accepted == 4  # issue times 100, 110, 120, 130: anything later is "from the future"


def test_candidacies_may_outlive_offers() -> None:
    stakes = StakeTable()
    stake = seeded_identity(10, "stake")
    c = make_candidacy(W, stake, epoch=5, now=10.0, stakes=stakes, lifetime=3 * 3600)
    assert check_candidacy(c, 10.0, stakes, min_stake=1).accepted
    c = make_candidacy(W, stake, epoch=5, now=10.0, stakes=stakes, lifetime=5 * 3600)
    assert check_candidacy(c, 10.0, stakes, min_stake=1).reason == "lifetime over the limit"
