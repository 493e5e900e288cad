"""Attestation claims: canonical encoding, the REPORTDATA binding, per-epoch keys.

``REPORTDATA = SHA-512(REPORTDATA_LABEL || wire.encode(claims))``: the TDX quote
carries these 64 bytes, so the quote vouches for every claim, both keys
included (binding only one would let a relay pair a genuine key with its own).
The same digest is the *claims hash* that HPKE ``info`` binds a request to.

A worker makes fresh keys every epoch (:func:`new_epoch_keys`): the X25519 key
requests are sealed to and the Ed25519 key of the TEE.  Dropping the old keys
after the freshness window gives forward secrecy across epochs.

Pure: no clock, no I/O; key generation uses the OS CSPRNG by design.
"""

from __future__ import annotations

import hashlib

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from overlay import wire
from overlay.errors import AttestationError

from .messages import Claims

__all__ = [
    "CLAIMS_VERSION",
    "NONE_SIG_LABEL",
    "REPORTDATA_LABEL",
    "TIERS",
    "TIER_RANK",
    "EpochKeys",
    "check_claims",
    "claims_hash",
    "new_epoch_keys",
    "raw_public",
    "report_data",
    "tier_rank",
]

CLAIMS_VERSION = 1
REPORTDATA_LABEL = b"cocoon-node/tee/reportdata/v1\x00"
NONE_SIG_LABEL = b"cocoon-node/tee/none-claims/v1\x00"

#: Confidentiality tiers, weakest first (the same ranks as ``market.records``).
TIERS = ("none", "tdx")
TIER_RANK = {"none": 0, "tdx": 1}


def tier_rank(tier: str) -> int:
    """Rank of a tier; unknown tiers rank -1 and never satisfy a minimum."""
    return TIER_RANK.get(tier, -1)


def report_data(claims: Claims) -> bytes:
    """The 64 bytes a quote's REPORTDATA must hold for these claims."""
    return hashlib.sha512(REPORTDATA_LABEL + wire.encode(claims)).digest()


#: The claims hash (HPKE ``info``, key lookup) is the REPORTDATA digest.
claims_hash = report_data


def raw_public(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@attrs.frozen
class EpochKeys:
    """One epoch's key pair set and the claims that name them."""

    enc_key: X25519PrivateKey
    sig_key: Ed25519PrivateKey
    claims: Claims
    claims_hash: bytes


def new_epoch_keys(
    *,
    tier: str,
    peer_id: str,
    model_id: str,
    model_hash: bytes,
    epoch: int,
    epoch_beacon: bytes,
    issued_at: int,
    not_after: int,
    gpu_evidence_hash: bytes = b"",
) -> EpochKeys:
    """Fresh X25519 + Ed25519 keys and the claims for them."""
    enc_key = X25519PrivateKey.generate()
    sig_key = Ed25519PrivateKey.generate()
    claims = Claims(
        version=CLAIMS_VERSION,
        tier=tier,
        peer_id=peer_id,
        enc_pk=raw_public(enc_key),
        sig_pk=raw_public(sig_key),
        model_id=model_id,
        model_hash=model_hash,
        epoch=epoch,
        epoch_beacon=epoch_beacon,
        issued_at=issued_at,
        not_after=not_after,
        gpu_evidence_hash=gpu_evidence_hash,
    )
    return EpochKeys(enc_key=enc_key, sig_key=sig_key, claims=claims, claims_hash=report_data(claims))


def check_claims(claims: Claims, *, now: float, peer_id: str | None = None) -> None:
    """Shape, peer and validity window of claims; raises AttestationError.

    Reasons: ``bad_claims`` (wrong version or key sizes), ``wrong_peer``,
    ``claims_expired`` (past ``not_after``, or issued in the future).
    """
    if claims.version != CLAIMS_VERSION:
        raise AttestationError("bad_claims", f"claims version {claims.version}, we speak {CLAIMS_VERSION}")
    if claims.tier not in TIER_RANK:
        raise AttestationError("bad_claims", f"unknown tier {claims.tier!r}")
    for name, value, size in (
        ("enc_pk", claims.enc_pk, 32),
        ("sig_pk", claims.sig_pk, 32),
        ("model_hash", claims.model_hash, 32),
        ("epoch_beacon", claims.epoch_beacon, 32),
    ):
        if len(value) != size:
            raise AttestationError("bad_claims", f"{name} is {len(value)} bytes, expected {size}")
    if claims.epoch < 0 or claims.not_after <= claims.issued_at:
        raise AttestationError("bad_claims", "negative epoch or empty validity window")
    if peer_id is not None and claims.peer_id != peer_id:
        raise AttestationError("wrong_peer", f"claims are for {claims.peer_id}, not {peer_id}")
    if now >= claims.not_after:
        raise AttestationError("claims_expired", f"claims expired at {claims.not_after}, now {int(now)}")
    if now < claims.issued_at - _CLOCK_SKEW:
        raise AttestationError("claims_expired", f"claims issued in the future ({claims.issued_at})")


_CLOCK_SKEW = 300  # seconds of clock difference tolerated on issued_at
