"""Confidential compute: attestation of workers and end-to-end sealing of their streams.

All confidential-computing code of cocoon-node lives here::

    messages.py   wire messages, tags 300-399 (Claims, AttestationReport, CollateralBundle,
                  TeePolicy/SignedPolicy, SealedRequest, SealedChunk, TranscriptSignature)
    claims.py     canonical claims, REPORTDATA = SHA-512(label || claims), per-epoch keys    (pure)
    quote.py      Intel TDX quote v4/v5 parser                                              (pure)
    roots.py      pinned roots: Intel SGX Root CA; TrustedRoot
    pki.py        quote/QE signatures, PCK chain to a pinned root, QE binding               (pure)
    dcap.py       dcap-qvl bridge: collateral store, TCB evaluation, error -> reason          (pure)
    policy.py     the Ed25519-signed allow-list (measurements, TCB statuses), k-of-n        (pure)
    verifier.py   Verifier (tiers tdx / none, LRU cache), ClientPolicy, ReportChecker      (pure)
    synthetic.py  the test TEE: v4/v5 quotes under a test P-256 PKI
    provider.py   the worker: configfs-tsm quotes, per-epoch rotation, ReportProvider   (trio shell)
    seal.py       HPKE request, numbered AEAD chunks, mandatory final, transcript sig  (pure)
    stream.py     SealedStream, a MessageStream sealed end to end                       (trio shell)

Tiers, honestly: ``tdx`` means a TDX confidential VM whose measurement is on the
signed allow-list; only with a confidential-computing GPU (H100-class) is GPU
memory protected too.  ``none`` means no TEE: a consumer GPU has no
confidential mode, so the machine's owner can read prompts; sealing still hides
them from proxies, relays and the network.

Failures raise :class:`~overlay.errors.AttestationError` (with a stable
``reason``) or :class:`~overlay.errors.SealError`.
"""

from __future__ import annotations

from .claims import (
    CLAIMS_VERSION,
    EpochKeys,
    check_claims,
    claims_hash,
    new_epoch_keys,
    report_data,
    tier_rank,
)
from .dcap import Collateral, CollateralStore
from .messages import (
    AttestationReport,
    Claims,
    CollateralBundle,
    Measurement,
    SealedChunk,
    SealedRequest,
    SignedPolicy,
    TeePolicy,
    TranscriptSignature,
)
from .policy import (
    PolicyStore,
    load_policy_file,
    measurement_digest,
    measurement_of,
    sign_policy,
    verify_policy,
)
from .provider import (
    ConfigfsTsm,
    EpochReport,
    QuoteSource,
    ReportProvider,
    SyntheticQuoteSource,
    make_none_report,
    make_tdx_report,
    pccs_collateral,
)
from .quote import Quote, TdReport, parse_quote
from .roots import INTEL_SGX_ROOT, TrustedRoot
from .seal import (
    ReplayGuard,
    Session,
    open_request,
    seal_request,
    verify_transcript,
)
from .stream import SealedStream
from .synthetic import SyntheticTee
from .verifier import (
    ClientPolicy,
    NoneVerifier,
    ReportChecker,
    TdxVerifier,
    VerifiedReport,
    Verifier,
)

__all__ = [
    "CLAIMS_VERSION",
    "INTEL_SGX_ROOT",
    "AttestationReport",
    "Claims",
    "ClientPolicy",
    "Collateral",
    "CollateralBundle",
    "CollateralStore",
    "ConfigfsTsm",
    "EpochKeys",
    "EpochReport",
    "Measurement",
    "NoneVerifier",
    "PolicyStore",
    "Quote",
    "QuoteSource",
    "ReplayGuard",
    "ReportChecker",
    "ReportProvider",
    "SealedChunk",
    "SealedRequest",
    "SealedStream",
    "Session",
    "SignedPolicy",
    "SyntheticQuoteSource",
    "SyntheticTee",
    "TdReport",
    "TdxVerifier",
    "TeePolicy",
    "TranscriptSignature",
    "TrustedRoot",
    "VerifiedReport",
    "Verifier",
    "check_claims",
    "claims_hash",
    "load_policy_file",
    "make_none_report",
    "make_tdx_report",
    "measurement_digest",
    "measurement_of",
    "new_epoch_keys",
    "open_request",
    "parse_quote",
    "pccs_collateral",
    "report_data",
    "seal_request",
    "sign_policy",
    "tier_rank",
    "verify_policy",
    "verify_transcript",
]
