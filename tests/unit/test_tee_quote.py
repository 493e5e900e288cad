"""The TDX quote parser and the pure signature/chain checks: synthetic quotes, and the real one if present."""

from __future__ import annotations

import datetime
import hashlib
import struct
from pathlib import Path

import dcap_qvl
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.tee.messages import MAX_QUOTE
from node.tee.pki import load_chain, verify_quote_crypto
from node.tee.quote import MAX_CHAIN, REPORT_DATA_OFFSET, parse_quote
from node.tee.roots import INTEL_ROOT_KEY_ID, INTEL_ROOT_SHA256, INTEL_SGX_ROOT
from node.tee.synthetic import SyntheticTee
from overlay.errors import AttestationError

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "tdx" / "tdx_quote"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC).timestamp()
PARSER_REASONS = {"bad_format", "wrong_version", "oversized"}
TEE = SyntheticTee(b"test-tee-quote-seed".ljust(32, b"\0"))
RD = hashlib.sha512(b"claims").digest()
V4 = TEE.quote(RD)


def test_intel_root_is_the_pinned_one() -> None:
    assert hashlib.sha256(INTEL_SGX_ROOT.der).digest() == INTEL_ROOT_SHA256
    assert INTEL_SGX_ROOT.key_id == INTEL_ROOT_KEY_ID
    assert INTEL_SGX_ROOT.evaluate_tcb


@pytest.mark.parametrize(("version", "body_type"), [(4, 2), (5, 2), (5, 3)])
def test_synthetic_quote_parses_and_agrees_with_dcap_qvl(version: int, body_type: int) -> None:
    raw = TEE.quote(RD, version=version, body_type=body_type)
    q = parse_quote(raw)
    assert (q.version, q.body_type) == (version, body_type)
    assert q.td.report_data == RD
    assert q.td.mr_td == SyntheticTee.MRTD
    assert q.td.rtmr == SyntheticTee.RTMRS
    assert not q.td.debug
    assert len(q.td.tee_tcb_svn2) == (16 if body_type == 3 else 0)
    ref = dcap_qvl.parse_quote(raw)  # an independent parser reads the same fields
    assert ref.header.version == version
    assert ref.report.mr_td == q.td.mr_td
    assert ref.report.report_data == q.td.report_data
    assert ref.report.rt_mr3 == q.td.rtmr[3]
    assert verify_quote_crypto(q, [INTEL_SGX_ROOT, TEE.root], NOW) is TEE.root


def test_v4_report_data_offset() -> None:
    assert V4[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64] == RD


@pytest.mark.skipif(not FIXTURE.exists(), reason="real TDX fixture absent (../shared/fixtures/tdx)")
def test_real_quote_agrees_with_dcap_qvl() -> None:
    raw = FIXTURE.read_bytes()
    q = parse_quote(raw)
    ref = dcap_qvl.parse_quote(raw)
    assert q.version == 4
    assert q.td.mr_td == ref.report.mr_td
    assert q.td.rtmr == (ref.report.rt_mr0, ref.report.rt_mr1, ref.report.rt_mr2, ref.report.rt_mr3)
    assert q.td.report_data == ref.report.report_data
    assert q.td.td_attributes == bytes.fromhex("0000001000000000")
    assert q.pck_chain_pem.rstrip(b"\0") == ref.cert_chain_pem_bytes()
    assert len(load_chain(q.pck_chain_pem)) == 3
    assert verify_quote_crypto(
        q, [INTEL_SGX_ROOT], datetime.datetime(2025, 6, 19, 12, tzinfo=datetime.UTC).timestamp()
    )


# --------------------------------------------------------------------------- typed rejections


def _reason(raw: bytes) -> str:
    with pytest.raises(AttestationError) as info:
        verify_quote_crypto(parse_quote(raw), [TEE.root], NOW)
    return info.value.reason


def test_wrong_version() -> None:
    for v in (3, 6, 0, 0xFFFF):
        assert _reason(struct.pack("<H", v) + V4[2:]) == "wrong_version"


def test_not_tdx_and_wrong_key_type() -> None:
    assert _reason(V4[:4] + struct.pack("<I", 0) + V4[8:]) == "bad_format"  # SGX tee_type
    assert _reason(V4[:2] + struct.pack("<H", 3) + V4[4:]) == "bad_format"  # P-384 key type
    assert _reason(V4[:12] + bytes(16) + V4[28:]) == "bad_format"  # unknown QE vendor


def test_oversized_quote_and_chain() -> None:
    assert _reason(V4 + bytes(MAX_QUOTE)) == "oversized"
    big_chain = TEE.chain_pem * (MAX_CHAIN // len(TEE.chain_pem) + 1)
    assert _reason(TEE.quote(RD, chain_pem=big_chain)) == "oversized"
    many = TEE.chain_pem + TEE.chain_pem  # 6 certificates, under the byte limit
    assert _reason(TEE.quote(RD, chain_pem=many)) == "oversized"


def test_trailing_bytes() -> None:
    assert parse_quote(V4 + bytes(70)).td.report_data == RD  # zero padding (as in the real sample)
    assert _reason(V4 + b"\x01") == "bad_format"


def test_flipped_bytes_fail_with_bad_signature() -> None:
    for offset in (10, REPORT_DATA_OFFSET, REPORT_DATA_OFFSET + 63, 636):  # header, REPORTDATA, signature
        raw = bytearray(V4)
        raw[offset] ^= 1
        assert _reason(bytes(raw)) == "bad_signature"
    qe_report_offset = 636 + 64 + 64 + 6
    raw = bytearray(V4)
    raw[qe_report_offset + 10] ^= 1  # QE report: its PCK signature breaks
    assert _reason(bytes(raw)) == "bad_signature"


def test_qe_binding_is_checked() -> None:
    raw = TEE.quote(RD, auth_data=bytes(32))
    auth_at = raw.index(bytes(32), 636 + 64 + 64 + 6 + 384 + 64 + 2)
    forged = raw[:auth_at] + b"\x01" + raw[auth_at + 1 :]  # auth data no longer hashes to the binding
    assert _reason(forged) == "bad_signature"


def test_untrusted_and_expired_chains() -> None:
    q = parse_quote(V4)
    with pytest.raises(AttestationError) as info:
        verify_quote_crypto(q, [INTEL_SGX_ROOT], NOW)
    assert info.value.reason == "untrusted_root"
    other = SyntheticTee(b"another seed".ljust(32, b"\0"))
    with pytest.raises(AttestationError) as info:
        verify_quote_crypto(q, [other.root], NOW)
    assert info.value.reason == "untrusted_root"
    expired = SyntheticTee(
        b"test-tee-quote-seed".ljust(32, b"\0"), leaf_not_after=datetime.datetime(2021, 1, 1)
    )
    with pytest.raises(AttestationError) as info:
        verify_quote_crypto(parse_quote(expired.quote(RD)), [TEE.root], NOW)
    assert info.value.reason == "cert_expired"
    # a chain whose root and CA are ours but whose leaf another test PKI issued
    foreign_leaf = other.leaf_cert.public_bytes(Encoding.PEM)
    ours = TEE.ca_cert.public_bytes(Encoding.PEM) + TEE.root_cert.public_bytes(Encoding.PEM)
    with pytest.raises(AttestationError) as info:
        verify_quote_crypto(parse_quote(TEE.quote(RD, chain_pem=foreign_leaf + ours)), [TEE.root], NOW)
    assert info.value.reason == "untrusted_root"


# --------------------------------------------------------------------------- fuzz

VERIFY_REASONS = PARSER_REASONS | {"bad_signature", "untrusted_root", "cert_expired"}


def _outcome(raw: bytes) -> str:
    """ "ok" or the reason of the typed error; anything else propagates and fails the test."""
    try:
        verify_quote_crypto(parse_quote(raw), [TEE.root], NOW)
    except AttestationError as e:
        return e.reason
    return "ok"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_random_bytes_raise_typed_errors_only(data: bytes) -> None:
    assert _outcome(data) in VERIFY_REASONS


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(V4) - 1))
def test_truncated_quotes_are_bad_format(cut: int) -> None:
    with pytest.raises(AttestationError) as info:
        parse_quote(V4[:cut])
    assert info.value.reason == "bad_format"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(V4) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_mutated_quotes_never_crash_the_verifier(flips: list[tuple[int, int]]) -> None:
    raw = bytearray(V4)
    for offset, mask in flips:
        raw[offset] ^= mask
    assert _outcome(bytes(raw)) in VERIFY_REASONS | {"ok"}


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=len(V4)))
def test_spliced_garbage_never_crashes(junk: bytes, at: int) -> None:
    assert _outcome(V4[:at] + junk + V4[at:]) in VERIFY_REASONS | {"ok"}
