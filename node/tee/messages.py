"""Wire messages of confidential compute (tags 300-399).

All of them go through :mod:`overlay.wire`; ``wire.encode`` is the canonical
form that hashes and signatures cover.

::

    300 Claims             what a worker's TEE vouches for (keys, peer, model, epoch, expiry)
    301 AttestationReport  tier + claims + evidence (quote or signature) + collateral reference
    302 CollateralBundle   dcap-qvl QuoteCollateralV3 JSON, fetched from Intel PCS / a PCCS
    310 TeePolicy          the allow-list: measurements, TCB statuses, platform flags
    311 SignedPolicy       a TeePolicy with k-of-n Ed25519 signatures by pinned release keys
    320 SealedRequest      HPKE-sealed first message of a confidential stream
    321 SealedChunk        one AEAD-sealed message of a confidential stream (either direction)
    322 TranscriptSignature  the worker's signature over a stream's transcript (its final chunk)

Sizes are bytes unless noted; times are integer Unix seconds.
"""

from __future__ import annotations

import attrs

from overlay import wire

__all__ = [
    "MAX_COLLATERAL",
    "MAX_QUOTE",
    "MAX_SEALED",
    "AttestationReport",
    "Claims",
    "CollateralBundle",
    "Measurement",
    "PolicySignature",
    "SealedChunk",
    "SealedRequest",
    "SignedPolicy",
    "TeePolicy",
    "TranscriptSignature",
]

MAX_QUOTE = 16 * 1024  # bytes: a TDX quote is about 5 KB (PEM chain ~3.7 KB)
MAX_COLLATERAL = 64 * 1024  # bytes: a collateral bundle is about 16 KB
MAX_SEALED = 768 * 1024  # bytes: one sealed message (under the 1 MiB frame limit)


@wire.message(300)
@attrs.frozen
class Claims:
    """What the worker's TEE (or, for tier ``none``, its identity key) vouches for."""

    version: int  # CLAIMS_VERSION
    tier: str = attrs.field(metadata=wire.limits(max_len=16))  # "tdx" | "none"
    peer_id: str = attrs.field(metadata=wire.limits(max_len=64))  # the worker's libp2p peer id
    enc_pk: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # X25519 public key requests are sealed to (rotates per epoch)
    sig_pk: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # Ed25519 public key of the TEE (rotates per epoch)
    model_id: str = attrs.field(metadata=wire.limits(max_len=128))
    model_hash: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # SHA-256 of weights + tokenizer + template
    epoch: int  # the epoch these keys belong to
    epoch_beacon: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # the chain's seed of that epoch (freshness)
    issued_at: int  # seconds
    not_after: int  # seconds: the claims (and their keys) expire
    gpu_evidence_hash: bytes = attrs.field(
        default=b"", metadata=wire.limits(max_len=64)
    )  # H(GPU CC evidence); b"" if none


@wire.message(301)
@attrs.frozen
class AttestationReport:
    """A worker's attestation: its claims and the evidence that binds them."""

    tier: str = attrs.field(metadata=wire.limits(max_len=16))  # must equal claims.tier
    claims: Claims
    evidence: bytes = attrs.field(
        metadata=wire.limits(max_len=MAX_QUOTE)
    )  # tdx: raw quote; none: Ed25519 sig by identity
    collateral_ref: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # SHA-256 of the CollateralBundle json; b"" for none


@wire.message(302)
@attrs.frozen
class CollateralBundle:
    """dcap-qvl ``QuoteCollateralV3`` JSON; its reference is SHA-256 of the UTF-8 text."""

    json: str = attrs.field(metadata=wire.limits(max_len=MAX_COLLATERAL))


@attrs.frozen
class Measurement:
    """One allowed TD image: MRTD (firmware) and RTMR0..3 (config, kernel, initrd+cmdline, app)."""

    name: str = attrs.field(metadata=wire.limits(max_len=64))  # e.g. "cocoon-worker 0.1.0"
    mrtd: bytes = attrs.field(metadata=wire.limits(max_len=48))
    rtmr0: bytes = attrs.field(metadata=wire.limits(max_len=48))
    rtmr1: bytes = attrs.field(metadata=wire.limits(max_len=48))
    rtmr2: bytes = attrs.field(metadata=wire.limits(max_len=48))
    rtmr3: bytes = attrs.field(metadata=wire.limits(max_len=48))


@wire.message(310)
@attrs.frozen
class TeePolicy:
    """The allow-list a verifier enforces on TDX quotes (distributed signed, see SignedPolicy)."""

    seq: int  # strictly increasing release number
    issued_at: int  # seconds
    not_after: int  # seconds: the policy must be renewed before this
    measurements: tuple[Measurement, ...] = attrs.field(metadata=wire.limits(max_items=256))
    tcb_statuses: tuple[str, ...] = attrs.field(
        default=("UpToDate",), metadata=wire.limits(max_items=8, max_len=48)
    )
    rejected_advisories: tuple[str, ...] = attrs.field(
        default=(), metadata=wire.limits(max_items=256, max_len=32)
    )
    min_tcb_eval_number: int = 0  # reject collateral older than this TCB evaluation data number
    allow_dynamic_platform: bool = True  # multi-package platforms (typical cloud hosts)
    allow_cached_keys: bool = True
    allow_smt: bool = True


@attrs.frozen
class PolicySignature:
    signer: bytes = attrs.field(metadata=wire.limits(max_len=32))  # raw Ed25519 public key (must be pinned)
    signature: bytes = attrs.field(
        metadata=wire.limits(max_len=64)
    )  # over POLICY_LABEL || wire.encode(policy)


@wire.message(311)
@attrs.frozen
class SignedPolicy:
    policy: TeePolicy
    signatures: tuple[PolicySignature, ...] = attrs.field(metadata=wire.limits(max_items=16))


@wire.message(320)
@attrs.frozen
class SealedRequest:
    """First frame of a confidential stream: HPKE ``enc || ciphertext`` to the claims' X25519 key."""

    claims_hash: bytes = attrs.field(
        metadata=wire.limits(max_len=64)
    )  # which claims (hence which key) it is sealed to
    sealed: bytes = attrs.field(metadata=wire.limits(max_len=MAX_SEALED))


@wire.message(321)
@attrs.frozen
class SealedChunk:
    """Every later frame: ChaCha20-Poly1305 over one padded wire message; seq and final in the AAD."""

    seq: int
    final: bool
    box: bytes = attrs.field(metadata=wire.limits(max_len=MAX_SEALED))


@wire.message(322)
@attrs.frozen
class TranscriptSignature:
    """The payload of the worker's final chunk: its attested Ed25519 key signs what it sent and received.

    The chunk AEAD already proves authorship to the client, but the client knows the keys too; this
    signature is evidence a third party can check (disputes over tokens delivered).
    """

    stream_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    sent: int  # messages the worker sent before the final chunk
    received: int  # messages it received, the request included
    sent_hash: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # SHA-256 over len||plaintext of each sent
    received_hash: bytes = attrs.field(metadata=wire.limits(max_len=32))
    signature: bytes = attrs.field(
        metadata=wire.limits(max_len=64)
    )  # by claims.sig_pk, see seal.transcript_message
