"""Report verification: tier none, the test TEE under a pinned test root, the cache, the client policy."""

from __future__ import annotations

import hashlib

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from market.verify import AttestationVerdict, AttestationVerifier
from node.tee import (
    AttestationReport,
    Claims,
    ClientPolicy,
    ReportChecker,
    SyntheticTee,
    TdxVerifier,
    TeePolicy,
    Verifier,
    make_none_report,
    make_tdx_report,
    new_epoch_keys,
    report_data,
)
from node.tee.claims import EpochKeys, raw_public
from node.tee.verifier import MAX_REPORT, peer_public_key
from overlay import wire
from overlay.errors import AttestationError

NOW = 1_800_000_000
BEACON = hashlib.sha256(b"beacon 7").digest()
TEE = SyntheticTee(b"test-tee-verify-seed".ljust(32, b"\0"))


def _identity(n: int) -> tuple[Ed25519PrivateKey, str]:
    from libp2p.crypto.ed25519 import Ed25519PublicKey as P2PKey
    from libp2p.peer.id import ID

    sk = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"id%d" % n).digest())
    return sk, ID.from_pubkey(P2PKey.from_bytes(raw_public(sk))).to_base58()


WORKER_SK, WORKER = _identity(1)
OTHER_SK, OTHER = _identity(2)


def _keys(tier: str, peer: str = WORKER, *, epoch: int = 7, not_after: int = NOW + 3600) -> EpochKeys:
    return new_epoch_keys(
        tier=tier,
        peer_id=peer,
        model_id="tiny",
        model_hash=hashlib.sha256(b"weights").digest(),
        epoch=epoch,
        epoch_beacon=BEACON,
        issued_at=NOW - 60,
        not_after=not_after,
    )


def _policy(**kw: object) -> TeePolicy:
    base = TeePolicy(seq=1, issued_at=NOW - 86400, not_after=NOW + 86400, measurements=(TEE.measurement,))
    return attrs.evolve(base, **kw)


def _verifier(*roots: object, policy: TeePolicy | None = None, cache_size: int = 1024) -> Verifier:
    tdx = TdxVerifier(policy=policy or _policy(), roots=roots or (TEE.root,))  # type: ignore[arg-type]
    return Verifier(tdx=tdx, cache_size=cache_size)


def _tdx_raw(claims: Claims, **quote_kw: object) -> bytes:
    quote = TEE.quote(report_data(claims), **quote_kw)  # type: ignore[arg-type]
    return wire.encode(make_tdx_report(claims, quote, None))


def _none_raw(claims: Claims, sk: Ed25519PrivateKey = WORKER_SK) -> bytes:
    return wire.encode(make_none_report(claims, sk.sign))


def _reason(v: Verifier, raw: bytes, *, now: float = NOW, peer_id: str | None = WORKER) -> str:
    with pytest.raises(AttestationError) as info:
        v.check(raw, now=now, peer_id=peer_id)
    return info.value.reason


# --------------------------------------------------------------------------- tier none


def test_none_report_verifies() -> None:
    keys = _keys("none")
    vr = _verifier().check(_none_raw(keys.claims), now=NOW, peer_id=WORKER)
    assert vr.tier == "none"
    assert vr.status == "none"
    assert vr.claims_hash == keys.claims_hash
    assert vr.expires_at == keys.claims.not_after
    assert peer_public_key(WORKER) == raw_public(WORKER_SK)


def test_none_report_forged_or_for_another_peer() -> None:
    v = _verifier()
    keys = _keys("none")
    assert _reason(v, _none_raw(keys.claims, OTHER_SK)) == "bad_signature"  # signed by someone else
    other = _keys("none", OTHER)
    assert _reason(v, _none_raw(other.claims, OTHER_SK)) == "wrong_peer"  # genuine, but not this peer's
    assert v.check(_none_raw(other.claims, OTHER_SK), now=NOW).claims.peer_id == OTHER  # genuine for OTHER
    garbage_peer = _keys("none", "not-a-peer-id")
    assert _reason(v, _none_raw(garbage_peer.claims), peer_id=None) == "bad_claims"


def test_claims_expiry_and_shape() -> None:
    v = _verifier()
    keys = _keys("none")
    raw = _none_raw(keys.claims)
    assert _reason(v, raw, now=keys.claims.not_after) == "claims_expired"
    assert _reason(v, raw, now=keys.claims.issued_at - 3600) == "claims_expired"
    bad = attrs.evolve(keys.claims, enc_pk=b"short")
    assert _reason(v, _none_raw(bad)) == "bad_claims"
    mismatch = AttestationReport(tier="tdx", claims=keys.claims, evidence=b"", collateral_ref=b"")
    assert _reason(v, wire.encode(mismatch)) == "bad_claims"


# --------------------------------------------------------------------------- the test TEE


def test_synthetic_tdx_report_verifies_under_the_test_root() -> None:
    keys = _keys("tdx")
    vr = _verifier().check(_tdx_raw(keys.claims), now=NOW, peer_id=WORKER)
    assert vr.tier == "tdx"
    assert vr.status == "NotEvaluated"
    assert vr.root == "synthetic-test-root"
    assert vr.claims.enc_pk == keys.claims.enc_pk
    assert len(vr.measurement) == 48


def test_synthetic_tdx_report_is_rejected_under_intel_root() -> None:
    from node.tee import INTEL_SGX_ROOT

    keys = _keys("tdx")
    assert _reason(_verifier(INTEL_SGX_ROOT), _tdx_raw(keys.claims)) == "untrusted_root"


@pytest.mark.parametrize(("version", "body_type"), [(4, 2), (5, 2), (5, 3)])
def test_synthetic_quote_versions(version: int, body_type: int) -> None:
    keys = _keys("tdx")
    raw = _tdx_raw(keys.claims, version=version, body_type=body_type)
    assert _verifier().check(raw, now=NOW, peer_id=WORKER).tier == "tdx"


def test_reportdata_binding() -> None:
    keys, other = _keys("tdx"), _keys("tdx")
    quote = TEE.quote(report_data(other.claims))  # a genuine quote, for other claims (other keys)
    raw = wire.encode(make_tdx_report(keys.claims, quote, None))
    assert _reason(_verifier(), raw) == "reportdata_mismatch"


def test_debug_and_measurement() -> None:
    keys = _keys("tdx")
    debug = _tdx_raw(keys.claims, td_attributes=bytes.fromhex("0100001000000000"))
    assert _reason(_verifier(), debug) == "debug_enabled"
    odd = _tdx_raw(keys.claims, mrtd=hashlib.sha384(b"another image").digest())
    assert _reason(_verifier(), odd) == "measurement_not_allowed"
    rtmr = _tdx_raw(keys.claims, rtmrs=(*SyntheticTee.RTMRS[:3], bytes(48)))
    assert _reason(_verifier(), rtmr) == "measurement_not_allowed"
    assert (
        _reason(_verifier(policy=_policy(measurements=())), _tdx_raw(keys.claims))
        == "measurement_not_allowed"
    )


def test_expired_policy_rejects_everything() -> None:
    keys = _keys("tdx")
    assert _reason(_verifier(policy=_policy(not_after=NOW)), _tdx_raw(keys.claims)) == "policy_expired"


def test_unsupported_tier_when_verifier_has_no_tdx() -> None:
    keys = _keys("tdx")
    assert _reason(Verifier(), _tdx_raw(keys.claims)) == "unsupported_tier"


def test_garbage_and_oversized_reports() -> None:
    v = _verifier()
    assert _reason(v, b"\x00\x01garbage") == "bad_format"
    assert _reason(v, wire.encode(wire.ErrorFrame("x", "y"))) == "bad_format"
    assert _reason(v, bytes(MAX_REPORT + 1)) == "oversized"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_random_reports_give_verdicts_not_crashes(data: bytes) -> None:
    verdict = _verifier().verify(data, now=NOW)
    assert not verdict.ok
    assert verdict.reason


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 255))
def test_mutated_tdx_reports_give_typed_verdicts(pos: int, mask: int) -> None:
    raw = bytearray(SAMPLE_TDX)
    raw[pos % len(raw)] ^= mask
    verdict = _verifier().verify(bytes(raw), now=NOW, peer_id=WORKER)
    assert verdict.ok or verdict.reason  # a verdict, never an exception


SAMPLE_TDX = _tdx_raw(_keys("tdx").claims)


# --------------------------------------------------------------------------- verdicts and cache


def test_verify_implements_the_market_protocol() -> None:
    v: AttestationVerifier = _verifier()
    raw = SAMPLE_TDX
    good = v.verify(raw, now=NOW, peer_id=WORKER)
    assert isinstance(good, AttestationVerdict)
    assert good.ok
    assert (good.tier, good.peer_id, good.reason, good.status) == ("tdx", WORKER, "", "NotEvaluated")
    assert good.report_hash == hashlib.sha256(raw).digest()
    bad = v.verify(raw, now=NOW, peer_id=OTHER)
    assert not bad.ok
    assert (bad.reason, bad.tier, bad.peer_id) == ("wrong_peer", "tdx", WORKER)
    nested = wire.decode(wire.encode(_VerdictCarrier(verdict=good)))  # market can nest it in a message
    assert nested == _VerdictCarrier(verdict=good)


@wire.message(399)
@attrs.frozen
class _VerdictCarrier:
    verdict: AttestationVerdict


def test_cache_hits_recheck_time_and_peer() -> None:
    v = _verifier()
    keys = _keys("tdx", not_after=NOW + 100)
    raw = _tdx_raw(keys.claims)
    v.check(raw, now=NOW, peer_id=WORKER)
    v.check(raw, now=NOW + 1, peer_id=WORKER)
    assert (v.hits, v.misses) == (1, 1)
    assert _reason(v, raw, now=NOW + 2, peer_id=OTHER) == "wrong_peer"
    assert _reason(v, raw, now=NOW + 100) == "claims_expired"
    assert v.hits == 2  # an expired entry is verified afresh (a miss) for the precise reason


def test_cached_verdicts_end_with_the_policy() -> None:
    v = _verifier(policy=_policy(not_after=NOW + 10))
    v.check(SAMPLE_TDX, now=NOW)
    assert _reason(v, SAMPLE_TDX, now=NOW + 10) == "policy_expired"


def test_cache_is_bounded_and_remembers_sticky_failures() -> None:
    v = _verifier(cache_size=4)
    raws = [_none_raw(_keys("none").claims) for _ in range(6)]
    for raw in raws:
        v.check(raw, now=NOW)
    assert len(v) == 4
    forged = _none_raw(_keys("none").claims, OTHER_SK)
    assert _reason(v, forged) == "bad_signature"
    misses = v.misses
    assert _reason(v, forged) == "bad_signature"
    assert v.misses == misses  # answered from the cache


def test_set_policy_clears_the_cache() -> None:
    v = _verifier()
    raw = SAMPLE_TDX
    v.check(raw, now=NOW)
    v.set_policy(_policy(measurements=()))
    assert _reason(v, raw) == "measurement_not_allowed"


# --------------------------------------------------------------------------- client policy


def test_client_policy() -> None:
    v = _verifier()
    none_raw, tdx_raw = _none_raw(_keys("none").claims), SAMPLE_TDX
    strict = ReportChecker(v, ClientPolicy(min_tier="tdx", max_epoch_age=1))
    assert strict.check(tdx_raw, peer_id=WORKER, now=NOW, epoch=8).tier == "tdx"
    with pytest.raises(AttestationError) as info:
        strict.check(none_raw, peer_id=WORKER, now=NOW, epoch=7)
    assert info.value.reason == "tier_too_low"
    for epoch in (9, 6):  # too old, from the future
        with pytest.raises(AttestationError) as info:
            strict.check(tdx_raw, peer_id=WORKER, now=NOW, epoch=epoch)
        assert info.value.reason == "stale_epoch"
    lax = ReportChecker(v, ClientPolicy())
    assert lax.check(none_raw, peer_id=WORKER, now=NOW, epoch=7, beacons={7: BEACON}).tier == "none"
    with pytest.raises(AttestationError) as info:
        lax.check(none_raw, peer_id=WORKER, now=NOW, epoch=7, beacons={7: bytes(32)})
    assert info.value.reason == "wrong_beacon"
    with pytest.raises(AttestationError) as info:
        lax.check(none_raw, peer_id=OTHER, now=NOW, epoch=7)
    assert info.value.reason == "wrong_peer"
