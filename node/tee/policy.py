"""The signed TDX policy file: allowed measurements and TCB rules, k-of-n release keys.

A policy file is ``wire.encode(SignedPolicy)`` (msgpack).  Each signature is
Ed25519 over ``POLICY_LABEL || wire.encode(policy)`` by a release key; a
verifier pins the release keys and a threshold, and accepts a policy only when
at least ``threshold`` distinct pinned keys signed it, ``issued_at <= now <
not_after`` and its ``seq`` is not below the last one accepted
(:class:`PolicyStore`, so an old allow-list cannot be replayed).

Reasons: ``bad_policy`` (undecodable, unsigned, bad signatures, expired,
rolled back).  Pure except :func:`load_policy_file`, which reads one file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from overlay import wire
from overlay.errors import AttestationError, DecodeError

from .claims import raw_public
from .messages import Measurement, PolicySignature, SignedPolicy, TeePolicy
from .quote import TdReport

__all__ = [
    "POLICY_LABEL",
    "PolicyStore",
    "load_policy_file",
    "measurement_digest",
    "measurement_of",
    "sign_policy",
    "verify_policy",
]

POLICY_LABEL = b"cocoon-node/tee/policy/v1\x00"
MAX_POLICY_FILE = 256 * 1024  # bytes


def measurement_of(td: TdReport, name: str = "") -> Measurement:
    """The allow-list entry that matches this TD report exactly."""
    return Measurement(
        name=name, mrtd=td.mr_td, rtmr0=td.rtmr[0], rtmr1=td.rtmr[1], rtmr2=td.rtmr[2], rtmr3=td.rtmr[3]
    )


def measurement_digest(m: Measurement) -> bytes:
    """SHA-384(MRTD || RTMR0..3): the 48-byte image measurement verdicts carry."""
    return hashlib.sha384(m.mrtd + m.rtmr0 + m.rtmr1 + m.rtmr2 + m.rtmr3).digest()


def _message(policy: TeePolicy) -> bytes:
    return POLICY_LABEL + wire.encode(policy)


def sign_policy(policy: TeePolicy, keys: Iterable[Ed25519PrivateKey]) -> SignedPolicy:
    """Sign a policy with release keys (the release tool; tests)."""
    data = _message(policy)
    sigs = tuple(PolicySignature(signer=raw_public(k), signature=k.sign(data)) for k in keys)
    return SignedPolicy(policy=policy, signatures=sigs)


def verify_policy(signed: SignedPolicy, *, signers: Sequence[bytes], threshold: int, now: float) -> TeePolicy:
    """The policy, if ``threshold`` distinct pinned ``signers`` signed it and it is valid at ``now``."""
    if threshold < 1:
        raise AttestationError("bad_policy", "threshold must be at least 1")
    pinned = set(signers)
    data = _message(signed.policy)
    good: set[bytes] = set()
    for sig in signed.signatures:
        if sig.signer not in pinned or sig.signer in good:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(sig.signer).verify(sig.signature, data)
        except (InvalidSignature, ValueError):
            raise AttestationError(
                "bad_policy", "a policy signature by a pinned key does not verify"
            ) from None
        good.add(sig.signer)
    if len(good) < threshold:
        raise AttestationError("bad_policy", f"{len(good)} valid pinned signatures, {threshold} required")
    policy = signed.policy
    if not policy.issued_at <= now < policy.not_after:
        raise AttestationError("bad_policy", f"policy seq {policy.seq} not valid at {int(now)}")
    for m in policy.measurements:
        if any(len(x) != 48 for x in (m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2, m.rtmr3)):
            raise AttestationError("bad_policy", f"measurement {m.name!r} has a field that is not 48 bytes")
    return policy


def load_policy_file(path: Path, *, signers: Sequence[bytes], threshold: int, now: float) -> TeePolicy:
    """Read and verify a policy file."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_FILE + 1)
    except OSError as e:
        raise AttestationError("bad_policy", f"cannot read policy file {path}: {e.strerror}") from e
    if len(data) > MAX_POLICY_FILE:
        raise AttestationError("bad_policy", f"policy file {path} over {MAX_POLICY_FILE} bytes")
    try:
        signed = wire.decode_as(SignedPolicy, data, max_size=MAX_POLICY_FILE)
    except DecodeError as e:
        raise AttestationError("bad_policy", f"policy file {path}: {e}") from e
    return verify_policy(signed, signers=signers, threshold=threshold, now=now)


class PolicyStore:
    """The current policy; accepts a new one only with a seq at least the current one's."""

    def __init__(self, *, signers: Sequence[bytes], threshold: int, policy: TeePolicy | None = None) -> None:
        self.signers = tuple(signers)
        self.threshold = threshold
        self.policy = policy

    def offer(self, signed: SignedPolicy, *, now: float) -> TeePolicy:
        """Verify and adopt ``signed``; an older seq raises ``bad_policy`` (rollback)."""
        policy = verify_policy(signed, signers=self.signers, threshold=self.threshold, now=now)
        if self.policy is not None and policy.seq < self.policy.seq:
            raise AttestationError("bad_policy", f"policy seq {policy.seq} older than {self.policy.seq}")
        self.policy = policy
        return policy
