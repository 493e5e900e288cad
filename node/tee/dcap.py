"""The dcap-qvl bridge: collateral bundles and full TDX verification (TCB evaluation).

dcap-qvl (Phala, Rust) checks the quote and QE signatures, the PCK chain to the
root we hand it, both CRLs, the QE Identity and the TCB Info for the quote's
FMSPC, all at an explicit ``now`` and offline.  It raises ``ValueError`` with a
message; :func:`reason_of` maps the message to our stable reason codes with an
ordered table (tested against real failures of the fixture quote).

Collateral is gossiped as :class:`~node.tee.messages.CollateralBundle` and
referenced from a report by SHA-256 of its JSON text; :class:`CollateralStore`
is a bounded map from reference to parsed collateral.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections import OrderedDict

import attrs
import dcap_qvl
from cryptography import x509

from overlay.errors import AttestationError

from .messages import MAX_COLLATERAL, TeePolicy
from .roots import TrustedRoot

__all__ = ["Collateral", "CollateralStore", "DcapResult", "dcap_verify", "reason_of"]

# (substring of dcap-qvl's message, reason); first match wins.
_REASONS: tuple[tuple[str, str], ...] = (
    ("Debug mode is enabled", "debug_enabled"),
    ("CrlExpired", "collateral_expired"),
    ("expired", "collateral_expired"),
    ("in the future", "collateral_expired"),
    ("Revoked", "revoked"),
    ("revoked", "revoked"),
    ("ISV enclave report signature is invalid", "bad_signature"),
    ("Signature is invalid for qe_report", "bad_signature"),
    ("QE report hash mismatch", "bad_signature"),
    ("TCB status", "tcb_status"),
    ("No matching TCB level", "tcb_status"),
    ("eval data number", "tcb_status"),
    ("advisor", "tcb_status"),
    ("not allowed by policy", "platform_not_allowed"),
    ("Failed to load root ca", "untrusted_root"),
    ("Failed to verify certificate chain", "untrusted_root"),
    ("UnknownIssuer", "untrusted_root"),
    ("Failed to decode quote", "bad_format"),
    ("Unsupported", "bad_format"),
    ("Unknown QE vendor", "bad_format"),
)


def reason_of(message: str) -> str:
    """Our reason code for a dcap-qvl error message (``collateral_invalid`` when nothing matches)."""
    for needle, reason in _REASONS:
        if needle in message:
            return reason
    return "collateral_invalid"


@attrs.frozen
class Collateral:
    """One parsed collateral bundle, with the figures our policy needs read once."""

    ref: bytes  # SHA-256 of the JSON text
    json: str = attrs.field(repr=False)
    parsed: dcap_qvl.QuoteCollateralV3 = attrs.field(eq=False, repr=False)
    eval_number: int  # TCB Info tcbEvaluationDataNumber
    expires_at: int  # seconds: earliest nextUpdate / notAfter over TCB Info, QE Identity, CRLs, chains

    @classmethod
    def from_json(cls, text: str) -> Collateral:
        if len(text) > MAX_COLLATERAL:
            raise AttestationError("oversized", f"collateral of {len(text)} characters")
        try:
            parsed = dcap_qvl.QuoteCollateralV3.from_json(text)
            doc = json.loads(text)
            tcb_info = json.loads(doc["tcb_info"])
            qe_identity = json.loads(doc["qe_identity"])
            limits = [_unix(tcb_info["nextUpdate"]), _unix(qe_identity["nextUpdate"])]
            for crl in ("pck_crl", "root_ca_crl"):
                next_update = x509.load_der_x509_crl(bytes.fromhex(doc[crl])).next_update_utc
                if next_update is None:
                    raise ValueError(f"{crl} has no nextUpdate")
                limits.append(int(next_update.timestamp()))
            for chain in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
                for cert in x509.load_pem_x509_certificates(doc[chain].encode()):
                    limits.append(int(cert.not_valid_after_utc.timestamp()))
            eval_number = int(tcb_info["tcbEvaluationDataNumber"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise AttestationError("collateral_invalid", str(e).splitlines()[0][:200]) from e
        return cls(hashlib.sha256(text.encode()).digest(), text, parsed, eval_number, min(limits))


def _unix(stamp: object) -> int:
    if not isinstance(stamp, str):
        raise ValueError("timestamp is not a string")
    return int(datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())


class CollateralStore:
    """Collateral by reference, least recently used evicted beyond ``capacity`` bundles."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, Collateral] = OrderedDict()

    def add(self, text: str) -> bytes:
        """Parse and keep a bundle; returns its reference.  Raises AttestationError if unparsable."""
        coll = Collateral.from_json(text)
        self._items[coll.ref] = coll
        self._items.move_to_end(coll.ref)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return coll.ref

    def get(self, ref: bytes) -> Collateral | None:
        coll = self._items.get(ref)
        if coll is not None:
            self._items.move_to_end(ref)
        return coll

    def __len__(self) -> int:
        return len(self._items)


@attrs.frozen
class DcapResult:
    status: str  # TCB status, e.g. "UpToDate"
    advisory_ids: tuple[str, ...]
    eval_data_number: int
    expires_at: int  # seconds: earliest nextUpdate over the collateral used


_verifiers: dict[bytes, dcap_qvl.QuoteVerifier] = {}


def _verifier(root: TrustedRoot) -> dcap_qvl.QuoteVerifier:
    v = _verifiers.get(root.der)
    if v is None:
        v = _verifiers[root.der] = dcap_qvl.QuoteVerifier(root.der)
    return v


def _quote_policy(policy: TeePolicy, now: int) -> dcap_qvl.QuotePolicy:
    p = dcap_qvl.QuotePolicy.strict(now)
    for status in policy.tcb_statuses:
        if status != "UpToDate":
            p = p.allow_status(status)
    if policy.rejected_advisories:
        p = p.reject_advisories(list(policy.rejected_advisories))
    if policy.min_tcb_eval_number:
        p = p.min_tcb_eval_data_number(policy.min_tcb_eval_number)
    return (
        p.allow_dynamic_platform(policy.allow_dynamic_platform)
        .allow_cached_keys(policy.allow_cached_keys)
        .allow_smt(policy.allow_smt)
    )


def _diagnose(raw: bytes, collateral: Collateral, root: TrustedRoot, now: int, message: str) -> str:
    """The policy API drops the cause of a chain failure (CrlExpired, revoked, unknown issuer);
    the legacy API keeps it, so ask it again on that (rare, already failed) path."""
    if reason_of(message) not in ("untrusted_root", "collateral_invalid"):
        return message
    try:
        dcap_qvl.verify_with_root_ca(raw, collateral.parsed, root.der, now)
    except ValueError as e:
        return str(e)
    return message


def dcap_verify(
    raw: bytes, collateral: Collateral, root: TrustedRoot, policy: TeePolicy, now: int
) -> DcapResult:
    """Full verification of a raw quote under ``root`` at ``now``; raises AttestationError.

    When the policy allows every platform flag (the default), dcap-qvl's one-shot
    ``verify_with_root_ca`` does the work and we apply the TCB rules ourselves
    (faster: no policy object, no claims JSON); otherwise its ``QuotePolicy``
    enforces the flags too.
    """
    try:
        if policy.allow_dynamic_platform and policy.allow_cached_keys and policy.allow_smt:
            report = dcap_qvl.verify_with_root_ca(raw, collateral.parsed, root.der, now)
            result = DcapResult(
                status=str(report.status),
                advisory_ids=tuple(str(a) for a in report.advisory_ids),
                eval_data_number=collateral.eval_number,
                expires_at=collateral.expires_at,
            )
        else:
            claims = _verifier(root).verify_with_policy(
                raw, collateral.parsed, now, _quote_policy(policy, now)
            )
            out = json.loads(claims.to_json())
            tcb = out["tcb"]
            result = DcapResult(
                status=str(tcb["status"]),
                advisory_ids=tuple(str(a) for a in tcb["advisory_ids"]),
                eval_data_number=int(tcb["eval_data_number"]),
                expires_at=min(
                    int(out["earliest_expiration_date"]), int(out["qe_iden_earliest_expiration_date"])
                ),
            )
    except (ValueError, TypeError, KeyError) as e:
        message = _diagnose(raw, collateral, root, now, str(e))
        raise AttestationError(reason_of(message), " ".join(message.split())[:300]) from e
    if result.status not in policy.tcb_statuses:
        raise AttestationError("tcb_status", f"TCB status {result.status} not in {list(policy.tcb_statuses)}")
    rejected = set(result.advisory_ids) & set(policy.rejected_advisories)
    if rejected:
        raise AttestationError("tcb_status", f"advisories {sorted(rejected)} are rejected by policy")
    if result.eval_data_number < policy.min_tcb_eval_number:
        raise AttestationError(
            "tcb_status",
            f"TCB evaluation data number {result.eval_data_number} < {policy.min_tcb_eval_number}",
        )
    return result
