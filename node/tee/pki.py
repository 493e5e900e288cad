"""Quote signatures and the PCK chain with ``cryptography``, pure (``now`` is explicit).

Steps 2-4 of quote verification (attestation/notes §2), used for quotes under
a root without TCB collateral (the test TEE) and as the chain check that picks
the pinned root for dcap-qvl:

1. the quote signature over header || body by the attestation key;
2. the PCK chain to a **pinned** root (never the root inside the quote), each
   certificate valid at ``now``, issuers CA-flagged;
3. the QE report signature by the PCK leaf key;
4. the QE binding: ``QE REPORTDATA = SHA-256(attestation key || auth data) || 0*32``.

Every failure raises :class:`~overlay.errors.AttestationError` with reason
``bad_signature``, ``untrusted_root``, ``cert_expired``, ``bad_format`` or
``oversized``.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from overlay.errors import AttestationError

from .quote import Quote
from .roots import TrustedRoot

__all__ = ["MAX_CERTS", "find_root", "load_chain", "verify_ecdsa_p256", "verify_quote_crypto"]

MAX_CERTS = 4  # certificates in a PCK chain (leaf, intermediate, root)
_ECDSA = ec.ECDSA(hashes.SHA256())


def _p256_key(xy: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + xy)
    except ValueError as e:
        raise AttestationError("bad_signature", "attestation key is not a P-256 point") from e


def verify_ecdsa_p256(key: ec.EllipticCurvePublicKey, sig_rs: bytes, data: bytes) -> bool:
    """True when ``sig_rs`` (r || s, 32 bytes each, big-endian) is a valid ECDSA-P256-SHA256 signature."""
    if len(sig_rs) != 64:
        return False
    r = int.from_bytes(sig_rs[:32], "big")
    s = int.from_bytes(sig_rs[32:], "big")
    if r == 0 or s == 0:
        return False
    try:
        key.verify(encode_dss_signature(r, s), data, _ECDSA)
    except InvalidSignature:
        return False
    return True


def load_chain(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM chain, leaf first (a trailing NUL is tolerated)."""
    try:
        certs = x509.load_pem_x509_certificates(pem.rstrip(b"\x00"))
    except ValueError as e:
        raise AttestationError("bad_format", f"PCK chain is not PEM certificates: {e}") from e
    if len(certs) > MAX_CERTS:
        raise AttestationError("oversized", f"PCK chain of {len(certs)} certificates, at most {MAX_CERTS}")
    if len(certs) < 2:
        raise AttestationError("bad_format", "PCK chain needs at least a leaf and an issuer")
    return certs


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def find_root(certs: Sequence[x509.Certificate], roots: Sequence[TrustedRoot]) -> TrustedRoot:
    """The pinned root the chain ends in (by public key), or ``untrusted_root``."""
    try:
        return _find_root(certs, roots)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # a malformed certificate
        raise AttestationError("bad_format", f"unreadable certificate in the PCK chain: {e}") from e


def _find_root(certs: Sequence[x509.Certificate], roots: Sequence[TrustedRoot]) -> TrustedRoot:
    top = certs[-1]
    top_key = _spki(top)
    for root in roots:
        if _spki(root.cert) == top_key:
            return root
    for root in roots:
        if top.issuer == root.cert.subject:
            return root
    raise AttestationError("untrusted_root", f"chain ends in {top.subject.rfc4514_string()!r}, not pinned")


def _check_validity(cert: x509.Certificate, now: datetime.datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationError(
            "cert_expired",
            f"{cert.subject.rfc4514_string()!r} valid {cert.not_valid_before_utc:%Y-%m-%d}"
            f" .. {cert.not_valid_after_utc:%Y-%m-%d}",
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _verify_chain(certs: Sequence[x509.Certificate], root: TrustedRoot, now: datetime.datetime) -> None:
    chain = list(certs)
    if _spki(chain[-1]) == _spki(root.cert):
        chain.pop()  # the quote's own copy of the root: replaced by the pinned one
    if not chain:
        raise AttestationError("bad_format", "PCK chain holds only a root")
    chain.append(root.cert)
    for cert in chain:
        _check_validity(cert, now)
    for child, parent in itertools.pairwise(chain):
        if not _is_ca(parent):
            raise AttestationError("untrusted_root", f"{parent.subject.rfc4514_string()!r} is not a CA")
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
            raise AttestationError(
                "untrusted_root", f"{child.subject.rfc4514_string()!r} not issued by the pinned chain"
            ) from e


def verify_quote_crypto(quote: Quote, roots: Sequence[TrustedRoot], now: float) -> TrustedRoot:
    """Signatures, chain and QE binding of a parsed quote; returns the pinned root it chains to."""
    att_key = _p256_key(quote.attestation_key)
    if not verify_ecdsa_p256(att_key, quote.signature, quote.signed_data):
        raise AttestationError("bad_signature", "quote signature does not verify with the attestation key")
    certs = load_chain(quote.pck_chain_pem)
    root = find_root(certs, roots)
    try:
        _verify_chain(certs, root, datetime.datetime.fromtimestamp(now, datetime.UTC))
        leaf_key = certs[0].public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # a malformed certificate
        raise AttestationError("bad_format", f"unreadable certificate in the PCK chain: {e}") from e
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or leaf_key.curve.name != "secp256r1":
        raise AttestationError("bad_format", "PCK leaf key is not P-256")
    if not verify_ecdsa_p256(leaf_key, quote.qe_report_signature, quote.qe_report.raw):
        raise AttestationError("bad_signature", "QE report signature does not verify with the PCK leaf")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.report_data != binding:
        raise AttestationError("bad_signature", "QE report does not bind the attestation key")
    return root
