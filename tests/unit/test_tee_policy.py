"""The signed policy file: k-of-n pinned Ed25519 release keys, validity window, no rollback."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from node.tee import (
    Measurement,
    PolicyStore,
    SignedPolicy,
    TeePolicy,
    load_policy_file,
    sign_policy,
    verify_policy,
)
from node.tee.claims import raw_public
from node.tee.messages import PolicySignature
from overlay import wire
from overlay.errors import AttestationError

NOW = 1_800_000_000
KEYS = [Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"release%d" % i).digest()) for i in range(4)]
PINNED = [raw_public(k) for k in KEYS[:3]]  # KEYS[3] is not pinned
M = Measurement("img", *(hashlib.sha384(b"m%d" % i).digest() for i in range(5)))
POLICY = TeePolicy(seq=5, issued_at=NOW - 10, not_after=NOW + 1000, measurements=(M,))


def _reason(signed: SignedPolicy, *, threshold: int = 2, now: float = NOW) -> str:
    with pytest.raises(AttestationError) as info:
        verify_policy(signed, signers=PINNED, threshold=threshold, now=now)
    assert info.value.reason == "bad_policy"
    return info.value.detail


def test_two_of_three() -> None:
    signed = sign_policy(POLICY, KEYS[:2])
    assert verify_policy(signed, signers=PINNED, threshold=2, now=NOW) == POLICY
    assert POLICY.tcb_statuses == ("UpToDate",)  # the default accepts UpToDate only
    assert "1 valid" in _reason(sign_policy(POLICY, KEYS[:1]))
    assert "1 valid" in _reason(sign_policy(POLICY, [KEYS[0], KEYS[3]]))  # an unpinned signer does not count
    assert "1 valid" in _reason(sign_policy(POLICY, [KEYS[0], KEYS[0]]))  # nor does the same key twice


def test_tampered_policy_and_forged_signature() -> None:
    signed = sign_policy(POLICY, KEYS[:2])
    looser = attrs.evolve(signed, policy=attrs.evolve(POLICY, tcb_statuses=("UpToDate", "OutOfDate")))
    assert "does not verify" in _reason(looser)
    forged = attrs.evolve(signed, signatures=(PolicySignature(PINNED[0], bytes(64)), *signed.signatures[1:]))
    assert "does not verify" in _reason(forged)


def test_validity_window_and_threshold() -> None:
    signed = sign_policy(POLICY, KEYS[:3])
    assert "not valid" in _reason(signed, now=POLICY.not_after)
    assert "not valid" in _reason(signed, now=POLICY.issued_at - 1)
    assert "threshold" in _reason(signed, threshold=0)
    bad_m = attrs.evolve(POLICY, measurements=(attrs.evolve(M, mrtd=b"short"),))
    assert "48 bytes" in _reason(sign_policy(bad_m, KEYS[:2]))


def test_store_refuses_rollback() -> None:
    store = PolicyStore(signers=PINNED, threshold=2)
    store.offer(sign_policy(POLICY, KEYS[:2]), now=NOW)
    newer = attrs.evolve(POLICY, seq=6)
    assert store.offer(sign_policy(newer, KEYS[1:3]), now=NOW).seq == 6
    with pytest.raises(AttestationError) as info:
        store.offer(sign_policy(POLICY, KEYS[:2]), now=NOW)
    assert "older" in info.value.detail
    assert store.policy is not None
    assert store.policy.seq == 6


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "tee-policy.bin"
    path.write_bytes(wire.encode(sign_policy(POLICY, KEYS[:2])))
    assert load_policy_file(path, signers=PINNED, threshold=2, now=NOW) == POLICY
    for content in (b"", b"garbage", wire.encode(POLICY), bytes(300 * 1024)):
        path.write_bytes(content)
        with pytest.raises(AttestationError) as info:
            load_policy_file(path, signers=PINNED, threshold=2, now=NOW)
        assert info.value.reason == "bad_policy"
    with pytest.raises(AttestationError) as info:
        load_policy_file(tmp_path / "missing", signers=PINNED, threshold=2, now=NOW)
    assert info.value.reason == "bad_policy"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1024))
def test_garbage_policy_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "policy"
        path.write_bytes(data)
        with pytest.raises(AttestationError) as info:
            load_policy_file(path, signers=PINNED, threshold=1, now=NOW)
    assert info.value.reason == "bad_policy"
