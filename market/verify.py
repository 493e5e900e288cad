"""Attestation verification as the market sees it: one Protocol and one verdict type.

The market core never imports ``node``.  The proxy and client shells are handed
an object implementing :class:`AttestationVerifier` (dependency injection);
``node.tee.Verifier`` is the real one (tiers ``tdx`` and ``none``, plus the test
TEE when its root is pinned).  A market test may pass any object with the same
``verify`` method.

``verify`` is pure and synchronous (about 1-2 ms for a TDX quote, microseconds
for a cached report), takes the time explicitly, and never raises for bad input:
a report that fails any check comes back as a verdict with ``ok=False`` and a
stable ``reason`` code (the ``AttestationError.reason`` of the failure, e.g.
``bad_signature``, ``untrusted_root``, ``collateral_expired``, ``tcb_status``,
``debug_enabled``, ``measurement_not_allowed``, ``reportdata_mismatch``,
``claims_expired``, ``wrong_peer``, ``bad_format``).
"""

from __future__ import annotations

from typing import Protocol

import attrs

__all__ = ["AttestationVerdict", "AttestationVerifier"]


@attrs.frozen
class AttestationVerdict:
    """The result of verifying one raw attestation report (wire-encodable as a nested struct)."""

    report_hash: bytes  # SHA-256 of the raw report bytes (= Offer.attestation_hash)
    ok: bool  # every check passed
    reason: str  # "" when ok, else the stable AttestationError.reason
    detail: str  # human-readable detail of a rejection ("" when ok)
    tier: str  # the tier the report claims ("tdx", "none"); trustworthy only when ok
    peer_id: str  # the worker peer id in the claims ("" when the report did not decode)
    status: str  # TDX: TCB status ("UpToDate", ...); tier none: "none"; "" when not reached
    measurement: bytes  # TDX: SHA-384(MRTD || RTMR0..3), 48 bytes; b"" otherwise
    model_hash: bytes  # the model hash in the claims (b"" when the report did not decode)
    epoch: int  # the epoch in the claims (-1 when the report did not decode)
    verified_at: float  # seconds: the `now` the verdict was computed at
    expires_at: float  # seconds: when the verdict stops holding (claims expiry, collateral nextUpdate)


class AttestationVerifier(Protocol):
    """Verifies raw attestation reports; implemented by ``node.tee.Verifier``."""

    def verify(self, report: bytes, *, now: float, peer_id: str | None = None) -> AttestationVerdict:
        """Verify ``report`` at ``now`` (seconds); ``peer_id`` is the peer it must belong to, if known.

        Never raises for bad input: rejections are verdicts with ``ok=False``.
        """
        ...
