"""Real data: Intel's TDX sample quote and its collateral, verified by dcap-qvl plus our checks.

Reads ../shared/fixtures/tdx relative to the project root (never copied into the project);
skipped cleanly when the fixture is absent.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.tee import (
    INTEL_SGX_ROOT,
    CollateralStore,
    SyntheticTee,
    TdxVerifier,
    TeePolicy,
    Verifier,
    make_tdx_report,
    measurement_of,
    new_epoch_keys,
    parse_quote,
)
from node.tee.dcap import reason_of
from node.tee.quote import REPORT_DATA_OFFSET
from overlay import wire
from overlay.errors import AttestationError

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "tdx"
QUOTE = FIXTURES / "tdx_quote"
COLLATERAL = FIXTURES / "tdx_quote_collateral.json"
pytestmark = pytest.mark.skipif(
    not (QUOTE.exists() and COLLATERAL.exists()), reason="real TDX fixture absent (../shared/fixtures/tdx)"
)

NOW = calendar.timegm((2025, 6, 19, 12, 0, 0))  # 2025-06-19T12:00:00Z
PCK_CRL_NEXT_UPDATE = calendar.timegm((2025, 7, 19, 10, 0, 35))
TCB_INFO_NEXT_UPDATE = calendar.timegm((2025, 7, 19, 10, 16, 3))


@pytest.fixture(scope="module")
def raw() -> bytes:
    data = QUOTE.read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith("c42f9164")
    return data


@pytest.fixture(scope="module")
def store() -> CollateralStore:
    s = CollateralStore()
    s.add(COLLATERAL.read_text())
    return s


@pytest.fixture(scope="module")
def ref() -> bytes:
    return hashlib.sha256(COLLATERAL.read_text().encode()).digest()


def _verifier(raw: bytes, store: CollateralStore, **policy: object) -> TdxVerifier:
    allowed = measurement_of(parse_quote(raw).td, "dcap-qvl sample")
    base = TeePolicy(seq=1, issued_at=NOW - 86400, not_after=NOW + 90 * 86400, measurements=(allowed,))
    return TdxVerifier(policy=attrs.evolve(base, **policy), roots=(INTEL_SGX_ROOT,), collateral=store)


def _reason(v: TdxVerifier, raw: bytes, ref: bytes, now: int = NOW) -> str:
    with pytest.raises(AttestationError) as info:
        v.check_quote(raw, now=now, collateral_ref=ref)
    return info.value.reason


def test_sample_quote_is_up_to_date(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    verdict = _verifier(raw, store).check_quote(raw, now=NOW, collateral_ref=ref)
    assert verdict.status == "UpToDate"
    assert verdict.advisory_ids == ()
    assert verdict.root is INTEL_SGX_ROOT
    assert verdict.expires_at == PCK_CRL_NEXT_UPDATE
    assert verdict.quote.td.mr_td.hex().startswith("91eb2b44d141d4ec")


def test_flipped_reportdata_byte(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    bad = bytearray(raw)
    bad[REPORT_DATA_OFFSET] ^= 1
    assert _reason(_verifier(raw, store), bytes(bad), ref) == "bad_signature"


def test_flipped_signature_byte(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    bad = bytearray(raw)
    bad[636 + 5] ^= 1  # inside the quote signature's r
    assert _reason(_verifier(raw, store), bytes(bad), ref) == "bad_signature"


@pytest.mark.parametrize("now", [PCK_CRL_NEXT_UPDATE + 1, TCB_INFO_NEXT_UPDATE + 1, NOW + 365 * 86400])
def test_now_past_next_update(raw: bytes, store: CollateralStore, ref: bytes, now: int) -> None:
    assert _reason(_verifier(raw, store), raw, ref, now) == "collateral_expired"


def test_now_before_issue(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    assert _reason(_verifier(raw, store), raw, ref, NOW - 86400) == "collateral_expired"


def test_reportdata_not_bound_to_our_claims(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    keys = new_epoch_keys(
        tier="tdx",
        peer_id="12D3KooWM1fkd4Uyda7gvV7reznkKUzdPu9RmvMYiM73GKP9HWVJ",
        model_id="m",
        model_hash=bytes(32),
        epoch=1,
        epoch_beacon=bytes(32),
        issued_at=NOW - 60,
        not_after=NOW + 3600,
    )
    report = wire.encode(make_tdx_report(keys.claims, raw, COLLATERAL.read_text()))
    verifier = Verifier(tdx=_verifier(raw, store))
    with pytest.raises(AttestationError) as info:
        verifier.check(report, now=NOW)
    assert info.value.reason == "reportdata_mismatch"


def test_tcb_status_policy(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    v = _verifier(raw, store, tcb_statuses=("SWHardeningNeeded",))
    assert _reason(v, raw, ref) == "tcb_status"
    assert _reason(_verifier(raw, store, min_tcb_eval_number=18), raw, ref) == "tcb_status"
    for flag in ("allow_dynamic_platform", "allow_cached_keys", "allow_smt"):
        assert _reason(_verifier(raw, store, **{flag: False}), raw, ref) == "platform_not_allowed"


def test_measurement_not_allowed(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    v = _verifier(raw, store, measurements=(SyntheticTee(bytes(32)).measurement,))
    assert _reason(v, raw, ref) == "measurement_not_allowed"


def test_missing_and_tampered_collateral(raw: bytes, store: CollateralStore) -> None:
    v = _verifier(raw, store)
    assert _reason(v, raw, b"") == "collateral_missing"
    doc = json.loads(COLLATERAL.read_text())
    sig = doc["tcb_info_signature"]
    doc["tcb_info_signature"] = ("00" if sig[:2] != "00" else "11") + sig[2:]
    tampered = CollateralStore()
    bad_ref = tampered.add(json.dumps(doc))
    assert _reason(_verifier(raw, tampered), raw, bad_ref) == "collateral_invalid"
    with pytest.raises(AttestationError) as info:
        tampered.add("{}")
    assert info.value.reason == "collateral_invalid"


def test_intel_quote_under_a_test_root(raw: bytes, store: CollateralStore, ref: bytes) -> None:
    v = TdxVerifier(
        policy=_verifier(raw, store).policy, roots=(SyntheticTee(bytes(32)).root,), collateral=store
    )
    assert _reason(v, raw, ref) == "untrusted_root"


def test_error_table_maps_known_messages() -> None:
    assert reason_of("Verification failed: Failed to verify certificate chain\n CrlExpired {..}") == (
        "collateral_expired"
    )
    assert reason_of("Verification failed: TCB status is invalid: Revoked") == "revoked"
    assert reason_of("Verification failed: Failed to load root ca") == "untrusted_root"
    assert reason_of("Verification failed: Debug mode is enabled") == "debug_enabled"
    assert reason_of("something new") == "collateral_invalid"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5005), st.integers(1, 255)), min_size=1, max_size=3))
def test_mutated_real_quote_gives_typed_errors(
    raw: bytes, store: CollateralStore, ref: bytes, flips: list[tuple[int, int]]
) -> None:
    bad = bytearray(raw)
    for pos, mask in flips:
        bad[pos % len(bad)] ^= mask
    outcome = "ok"
    try:
        _verifier(raw, store).check_quote(bytes(bad), now=NOW, collateral_ref=ref)
    except AttestationError as e:  # typed; never a crash, never a panic from the Rust core
        outcome = e.reason
    assert outcome in {
        "ok",
        "bad_format",
        "wrong_version",
        "oversized",
        "bad_signature",
        "untrusted_root",
    } | {
        "collateral_invalid",
        "collateral_expired",
        "tcb_status",
        "debug_enabled",
        "measurement_not_allowed",
        "platform_not_allowed",
        "revoked",
        "cert_expired",
    }
