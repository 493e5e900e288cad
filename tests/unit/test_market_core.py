"""ProxyCore and endorse: the proxy's market state end to end, without I/O."""

from __future__ import annotations

import random

import attrs

from market.core import ProxyCore, endorse
from market.records import MatchRequest, UsageReport, WorkerHeartbeat
from market.testing import MODEL_HASH, make_offer, seeded_identity
from market.validation import Decision, check_verdict
from market.verify import AttestationVerdict

PROXY = seeded_identity(0, "proxy")
W = [seeded_identity(i, "worker") for i in range(4)]
REPORT = b"r" * 32


def att(**change: object) -> AttestationVerdict:
    v = AttestationVerdict(
        report_hash=REPORT,
        ok=True,
        reason="",
        detail="",
        tier="tdx",
        peer_id=W[0].peer_id,
        status="UpToDate",
        measurement=b"m" * 48,
        model_hash=MODEL_HASH,
        epoch=3,
        verified_at=10.0,
        expires_at=5000.0,
    )
    return attrs.evolve(v, **change)


def request(**change: object) -> MatchRequest:
    req = MatchRequest(1, "tiny", 1000, 1000, "none", 3, ())
    return attrs.evolve(req, **change)


def test_endorse_binds_the_report_to_the_offer() -> None:
    offer = make_offer(W[0], now=10.0, tier="tdx", attestation_hash=REPORT).body
    v = endorse(PROXY, offer, att(), 10.0)
    assert v.body.status == "ok"
    assert v.body.expires_at == 10.0 + 3600
    assert check_verdict(v, 11.0).accepted
    for change, reason in [
        ({"peer_id": W[1].peer_id}, "wrong_peer"),
        ({"model_hash": b"x" * 32}, "wrong_model"),
        ({"tier": "none"}, "tier_mismatch"),
        ({"report_hash": b"z" * 32}, "report_hash_mismatch"),
        ({"ok": False, "reason": "bad_signature"}, "bad_signature"),
    ]:
        bad = endorse(PROXY, offer, att(**change), 10.0)
        assert (bad.body.status, bad.body.reason) == ("rejected", reason)
        assert check_verdict(bad, 11.0).accepted  # a well-formed rejection


def test_attested_offers_wait_for_verification() -> None:
    core = ProxyCore()
    rec = make_offer(W[0], now=10.0, tier="tdx", attestation_hash=REPORT)
    assert core.receive_offer(rec, 10.0, "relay").accepted
    assert core.pending_verifications() == [rec]
    assert core.match(request(min_tier="tdx"), 11.0, random.Random(0)).offers == ()
    verdict = endorse(PROXY, rec.body, att(), 11.0)
    assert core.receive_verdict(verdict, 11.0, "relay", trusted=False).decision is Decision.IGNORE
    assert core.receive_verdict(verdict, 11.0, "relay", trusted=True).accepted
    assert core.pending_verifications() == []
    resp = core.match(request(min_tier="tdx"), 12.0, random.Random(0))
    assert [r.body.peer_id for r in resp.offers] == [W[0].peer_id]
    assert resp.verdicts == (verdict,)


def test_without_a_verifier_only_tier_none_is_accepted() -> None:
    core = ProxyCore(attested_tiers=False)
    tdx = make_offer(W[0], now=10.0, tier="tdx", attestation_hash=REPORT)
    assert core.receive_offer(tdx, 10.0).decision is Decision.IGNORE
    assert core.receive_offer(make_offer(W[1], now=10.0), 10.0).accepted


def test_match_response_heartbeats_usage_and_stats() -> None:
    core = ProxyCore(book=None)
    core.book.exploration = 0.0
    for i, w in enumerate(W):
        assert core.receive_offer(make_offer(w, now=0.0, price_completion=100 * (i + 1)), 0.0).accepted
    resp = core.match(request(count=2), 1.0, random.Random(0))
    assert [r.body.peer_id for r in resp.offers] == [W[0].peer_id, W[1].peer_id]
    # Full by heartbeat: the cheapest worker is skipped.
    core.heartbeat(W[0].peer_id, WorkerHeartbeat(1, 4, 4, 0, 50.0, 3.0, 2.0, 1.0), 1.0)
    resp = core.match(request(count=1), 2.0, random.Random(0))
    assert [r.body.peer_id for r in resp.offers] == [W[1].peer_id]
    # Bad reports push a worker down the ranking.
    for _ in range(30):
        core.usage(UsageReport(W[1].peer_id, False, 10, 500), 2.0)
    resp = core.match(request(count=1), 3.0, random.Random(0))
    assert resp.offers[0].body.peer_id != W[1].peer_id
    # Nothing under the cap: a price hint.
    resp = core.match(request(max_price_completion=50), 3.0, random.Random(0))
    assert resp.offers == ()
    assert resp.price_hint == 200  # the 100 one is full
    assert "200" in resp.reason
    assert core.match(request(min_tier="bogus"), 3.0, random.Random(0)).reason.startswith("unknown tier")
    s = core.stats("tiny", 3.0, proxy_peer_id=PROXY.peer_id, proxy_key=PROXY.public_key)
    assert s.live_offers == 4
    assert s.fills == 3
    assert core.tick(10_000.0) != []
    assert len(core.book) == 0


def test_a_worker_unreachable_for_a_client_is_suspended() -> None:
    core = ProxyCore(suspend_s=30.0)
    core.book.exploration = 0.0
    for w in W[:2]:
        core.receive_offer(make_offer(w, now=0.0), 0.0)
    core.usage(UsageReport(W[0].peer_id, False, 0, 0), 1.0)
    assert W[0].peer_id not in [
        r.body.peer_id for r in core.match(request(count=4), 2.0, random.Random(0)).offers
    ]
    assert W[0].peer_id in [
        r.body.peer_id for r in core.match(request(count=4), 32.0, random.Random(0)).offers
    ]
    # A failure after some tokens costs reputation but not a suspension.
    core.usage(UsageReport(W[1].peer_id, False, 50, 50), 33.0)
    assert not core.book.suspended(W[1].peer_id, 33.5)
