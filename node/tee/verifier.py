"""Verifying attestation reports: one interface, one verifier per tier, a cache, client policy.

::

    Verifier                 raw report bytes -> VerifiedReport (check, raises) or
     │                       AttestationVerdict (verify, never raises; market.verify protocol);
     │                       LRU cache by SHA-256(report); re-checks expiry and peer on a hit
     ├── TdxVerifier         tier "tdx": parse the quote, chain to a pinned root, then
     │                         Intel root  -> dcap-qvl with collateral (TCB status, CRLs, freshness)
     │                         test root   -> signatures + QE binding with `cryptography` (no TCB)
     │                       then ours: REPORTDATA = SHA-512(label || claims), DEBUG off,
     │                       MRTD + RTMR0..3 on the signed policy's allow-list
     └── NoneVerifier        tier "none": no quote; the claims signed by the worker's identity key
    ClientPolicy             minimum tier, freshness window in epochs, beacon match

Proxies call ``Verifier.verify`` (their verdicts are filters); clients call
``ReportChecker.check`` (the same verifier plus their own policy) and never
trust a proxy's verdict.  Everything here is pure: ``now`` is explicit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from market.verify import AttestationVerdict
from overlay import wire
from overlay.errors import AttestationError, DecodeError

from .claims import NONE_SIG_LABEL, check_claims, report_data, tier_rank
from .dcap import CollateralStore, dcap_verify
from .messages import AttestationReport, Claims, Measurement, TeePolicy
from .pki import find_root, load_chain, verify_quote_crypto
from .policy import measurement_digest, measurement_of
from .quote import Quote, parse_quote
from .roots import INTEL_SGX_ROOT, TrustedRoot

__all__ = [
    "MAX_REPORT",
    "ClientPolicy",
    "NoneVerifier",
    "QuoteVerdict",
    "ReportChecker",
    "TdxVerifier",
    "TierVerifier",
    "VerifiedReport",
    "Verifier",
    "none_evidence_message",
    "peer_public_key",
]

MAX_REPORT = 48 * 1024  # bytes: one encoded AttestationReport

#: Failures that depend only on the report bytes (and the policy): cached like successes.
_STICKY = frozenset(
    {
        "bad_format",
        "wrong_version",
        "oversized",
        "bad_signature",
        "untrusted_root",
        "debug_enabled",
        "bad_claims",
        "reportdata_mismatch",
        "measurement_not_allowed",
        "unsupported_tier",
    }
)


@attrs.frozen
class VerifiedReport:
    """A report every check passed on."""

    report: AttestationReport
    report_hash: bytes  # SHA-256 of the raw report
    claims_hash: bytes  # SHA-512(label || claims): HPKE info, key lookup
    status: str  # TCB status, "NotEvaluated" under a test root, "none" for tier none
    measurement: bytes  # SHA-384(MRTD || RTMR0..3); b"" for tier none
    advisory_ids: tuple[str, ...]
    root: str  # name of the pinned root; "" for tier none
    verified_at: float
    expires_at: float  # min(claims.not_after, collateral nextUpdate)

    @property
    def claims(self) -> Claims:
        return self.report.claims

    @property
    def tier(self) -> str:
        return self.report.tier


@attrs.frozen
class QuoteVerdict:
    """A TDX quote that verified (before our claims binding and measurement checks)."""

    quote: Quote
    root: TrustedRoot
    status: str
    advisory_ids: tuple[str, ...]
    expires_at: float


class TierVerifier(Protocol):
    """Verifies reports of one tier; raises AttestationError."""

    tier: str

    def check(self, report: AttestationReport, *, report_hash: bytes, now: float) -> VerifiedReport: ...


def peer_public_key(peer_id: str) -> bytes | None:
    """The raw Ed25519 key inlined in a libp2p peer id (None when it holds none)."""
    from libp2p.crypto.ed25519 import Ed25519PublicKey as P2PKey
    from libp2p.peer.id import ID

    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # base58 / multihash / protobuf errors of a garbage id
        return None
    return bytes(key.to_bytes()) if isinstance(key, P2PKey) else None


def none_evidence_message(claims: Claims) -> bytes:
    """What the identity key signs for tier ``none``."""
    return NONE_SIG_LABEL + wire.encode(claims)


class NoneVerifier:
    """Tier ``none``: no TEE; the claims are signed by the worker's libp2p identity key."""

    tier = "none"

    def check(self, report: AttestationReport, *, report_hash: bytes, now: float) -> VerifiedReport:
        if report.collateral_ref:
            raise AttestationError("bad_format", "tier none carries no collateral")
        key = peer_public_key(report.claims.peer_id)
        if key is None:
            raise AttestationError("bad_claims", "peer id holds no Ed25519 key")
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(
                report.evidence, none_evidence_message(report.claims)
            )
        except (InvalidSignature, ValueError):
            raise AttestationError("bad_signature", "claims not signed by the peer's identity key") from None
        return VerifiedReport(
            report=report,
            report_hash=report_hash,
            claims_hash=report_data(report.claims),
            status="none",
            measurement=b"",
            advisory_ids=(),
            root="",
            verified_at=now,
            expires_at=float(report.claims.not_after),
        )


class TdxVerifier:
    """Tier ``tdx``: quotes under the pinned ``roots``, judged by ``policy``."""

    tier = "tdx"

    def __init__(
        self,
        *,
        policy: TeePolicy,
        roots: Sequence[TrustedRoot] = (INTEL_SGX_ROOT,),
        collateral: CollateralStore | None = None,
    ) -> None:
        self.policy = policy
        self.roots = tuple(roots)
        self.collateral = CollateralStore() if collateral is None else collateral
        self._root_of_chain: dict[bytes, TrustedRoot] = {}  # PEM chain -> pinned root it ends in
        self._allowed_for: TeePolicy | None = None
        self._allowed_set: frozenset[Measurement] = frozenset()

    def _root(self, chain_pem: bytes) -> TrustedRoot:
        """The pinned root a PCK chain ends in; cached (a platform's chain repeats in every quote).

        Only a choice of root: the chain itself is verified on every call (by dcap-qvl or pki).
        """
        root = self._root_of_chain.get(chain_pem)
        if root is None:
            root = find_root(load_chain(chain_pem), self.roots)
            if len(self._root_of_chain) >= 256:
                self._root_of_chain.clear()
            self._root_of_chain[chain_pem] = root
        return root

    def check_quote(self, raw: bytes, *, now: float, collateral_ref: bytes = b"") -> QuoteVerdict:
        """Parse and verify a raw quote (chain, signatures, TCB), then DEBUG and measurement."""
        quote = parse_quote(raw)
        root = self._root(quote.pck_chain_pem)
        if root.evaluate_tcb:
            coll = self.collateral.get(collateral_ref)
            if coll is None:
                raise AttestationError("collateral_missing", f"no collateral {collateral_ref.hex()[:16]}")
            res = dcap_verify(raw, coll, root, self.policy, int(now))
            status, advisories, expires = res.status, res.advisory_ids, float(res.expires_at)
        else:
            verify_quote_crypto(quote, (root,), now)
            status, advisories, expires = "NotEvaluated", (), float("inf")
        if quote.td.debug:
            raise AttestationError("debug_enabled", "TD attribute DEBUG is set")
        if measurement_of(quote.td) not in self._allowed():
            raise AttestationError(
                "measurement_not_allowed", f"MRTD {quote.td.mr_td.hex()[:16]}... not allowed"
            )
        return QuoteVerdict(
            quote=quote, root=root, status=status, advisory_ids=advisories, expires_at=expires
        )

    def _allowed(self) -> frozenset[Measurement]:
        if self._allowed_for is not self.policy:
            self._allowed_set = frozenset(attrs.evolve(m, name="") for m in self.policy.measurements)
            self._allowed_for = self.policy
        return self._allowed_set

    def check(self, report: AttestationReport, *, report_hash: bytes, now: float) -> VerifiedReport:
        if now >= self.policy.not_after:
            raise AttestationError("policy_expired", f"policy seq {self.policy.seq} expired")
        verdict = self.check_quote(report.evidence, now=now, collateral_ref=report.collateral_ref)
        expected = report_data(report.claims)
        if verdict.quote.td.report_data != expected:
            raise AttestationError("reportdata_mismatch", "quote REPORTDATA does not bind these claims")
        return VerifiedReport(
            report=report,
            report_hash=report_hash,
            claims_hash=expected,
            status=verdict.status,
            measurement=measurement_digest(measurement_of(verdict.quote.td)),
            advisory_ids=verdict.advisory_ids,
            root=verdict.root.name,
            verified_at=now,
            expires_at=min(float(report.claims.not_after), verdict.expires_at),
        )


class Verifier:
    """The one verifier: dispatch by tier, cache by report hash (LRU, ``cache_size`` entries)."""

    def __init__(
        self,
        *,
        tdx: TdxVerifier | None = None,
        none: NoneVerifier | None = None,
        cache_size: int = 1024,
    ) -> None:
        self.tdx = tdx
        self._tiers: dict[str, TierVerifier] = {}
        if tdx is not None:
            self._tiers["tdx"] = tdx
        self._tiers["none"] = NoneVerifier() if none is None else none
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, VerifiedReport | AttestationError] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def set_policy(self, policy: TeePolicy) -> None:
        """Adopt a new TDX policy (already verified, see PolicyStore) and forget cached results."""
        if self.tdx is None:
            raise AttestationError("unsupported_tier", "this verifier has no tdx tier")
        self.tdx.policy = policy
        self._cache.clear()

    def check(self, raw: bytes, *, now: float, peer_id: str | None = None) -> VerifiedReport:
        """Verify a raw report; raises AttestationError with a stable ``reason``."""
        return self._check(raw, now, peer_id)[1]

    def verify(self, report: bytes, *, now: float, peer_id: str | None = None) -> AttestationVerdict:
        """``market.verify.AttestationVerifier``: a verdict, never an exception for bad input."""
        h = hashlib.sha256(report).digest()
        try:
            _, v = self._check(report, now, peer_id)
        except AttestationError as e:
            decoded = self._decode_quietly(report)
            c = decoded.claims if decoded is not None else None
            return AttestationVerdict(
                report_hash=h,
                ok=False,
                reason=e.reason,
                detail=e.detail[:256],
                tier=decoded.tier if decoded is not None else "",
                peer_id=c.peer_id if c is not None else "",
                status="",
                measurement=b"",
                model_hash=c.model_hash if c is not None else b"",
                epoch=c.epoch if c is not None else -1,
                verified_at=now,
                expires_at=now,
            )
        return AttestationVerdict(
            report_hash=h,
            ok=True,
            reason="",
            detail="",
            tier=v.tier,
            peer_id=v.claims.peer_id,
            status=v.status,
            measurement=v.measurement,
            model_hash=v.claims.model_hash,
            epoch=v.claims.epoch,
            verified_at=now,
            expires_at=v.expires_at,
        )

    # ---- internals

    @staticmethod
    def _decode_quietly(raw: bytes) -> AttestationReport | None:
        try:
            return wire.decode_as(AttestationReport, raw, max_size=MAX_REPORT)
        except DecodeError:
            return None

    def _check(self, raw: bytes, now: float, peer_id: str | None) -> tuple[AttestationReport, VerifiedReport]:
        if len(raw) > MAX_REPORT:
            raise AttestationError("oversized", f"report of {len(raw)} bytes over {MAX_REPORT}")
        h = hashlib.sha256(raw).digest()
        cached = self._cache.get(h)
        if cached is not None:
            self._cache.move_to_end(h)
            if isinstance(cached, AttestationError):
                self.hits += 1
                raise AttestationError(cached.reason, cached.detail)
            if now < cached.expires_at and not (self.tdx is not None and now >= self.tdx.policy.not_after):
                self.hits += 1
                check_claims(cached.claims, now=now, peer_id=peer_id)
                return cached.report, cached
            del self._cache[h]  # expired: verify afresh, for the precise reason
        self.misses += 1
        try:
            report = wire.decode_as(AttestationReport, raw, max_size=MAX_REPORT)
        except DecodeError as e:
            self._remember(h, AttestationError("bad_format", f"not an AttestationReport: {e}"))
            raise AttestationError("bad_format", f"not an AttestationReport: {e}") from e
        try:
            if report.tier != report.claims.tier:
                raise AttestationError("bad_claims", f"report tier {report.tier!r} != claims tier")
            check_claims(report.claims, now=now, peer_id=peer_id)
            tier = self._tiers.get(report.tier)
            if tier is None:
                raise AttestationError("unsupported_tier", f"tier {report.tier!r} is not accepted here")
            verified = tier.check(report, report_hash=h, now=now)
        except AttestationError as e:
            if e.reason in _STICKY:
                self._remember(h, e)
            raise
        self._remember(h, verified)
        return report, verified

    def _remember(self, h: bytes, result: VerifiedReport | AttestationError) -> None:
        self._cache[h] = result
        self._cache.move_to_end(h)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)


@attrs.frozen
class ClientPolicy:
    """What a client demands of a worker before sealing a prompt to it."""

    min_tier: str = "none"  # "tdx" to require a confidential VM (the --require-tee flag)
    max_epoch_age: int = 1  # epochs: claims of the current epoch or up to this many before

    def admit(
        self, verified: VerifiedReport, *, epoch: int, beacons: Mapping[int, bytes] | None = None
    ) -> None:
        """Raise AttestationError (``tier_too_low``, ``stale_epoch``, ``wrong_beacon``) unless admitted."""
        if tier_rank(verified.tier) < tier_rank(self.min_tier) or tier_rank(verified.tier) < 0:
            raise AttestationError("tier_too_low", f"tier {verified.tier}, at least {self.min_tier} required")
        c = verified.claims
        if c.epoch > epoch or epoch - c.epoch > self.max_epoch_age:
            raise AttestationError("stale_epoch", f"claims of epoch {c.epoch}, now epoch {epoch}")
        if beacons is not None:
            beacon = beacons.get(c.epoch)
            if beacon is None or beacon != c.epoch_beacon:
                raise AttestationError("wrong_beacon", f"epoch {c.epoch} beacon does not match the chain's")


class ReportChecker:
    """A client's check of a worker: its own verification (shared cache) plus its policy."""

    def __init__(self, verifier: Verifier, policy: ClientPolicy) -> None:
        self.verifier = verifier
        self.policy = policy

    def check(
        self,
        raw: bytes,
        *,
        peer_id: str,
        now: float,
        epoch: int,
        beacons: Mapping[int, bytes] | None = None,
    ) -> VerifiedReport:
        verified = self.verifier.check(raw, now=now, peer_id=peer_id)
        self.policy.admit(verified, epoch=epoch, beacons=beacons)
        return verified
