"""The test TEE: TDX quotes synthesized in the exact v4/v5 layout under a test PKI.

Not confidential at all: it exists so that the whole attestation path (quote
parsing, chain to a pinned root, quote and QE signatures, QE binding,
REPORTDATA binding, measurement allow-list) runs in tests and devnets without
TDX hardware.  Its quotes chain ``test root -> test platform CA -> test PCK
leaf``, all P-256; they verify only where :attr:`SyntheticTee.root` is pinned
and fail with ``untrusted_root`` where Intel's root is.  There is no TCB
collateral for a test root, so its verdicts carry TCB status ``NotEvaluated``.

Keys derive from a seed, so two processes with the same seed make quotes under
the same root (a fake configfs-tsm process in tests uses this).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .messages import Measurement
from .quote import INTEL_QE_VENDOR_ID, QE_REPORT_LEN, TEE_TDX
from .roots import TrustedRoot

__all__ = ["SyntheticTee", "sign_rs"]

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ECDSA = ec.ECDSA(hashes.SHA256())
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(2049, 12, 31, tzinfo=datetime.UTC)


def _derive(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    n = int.from_bytes(hashlib.sha512(seed + label.encode()).digest(), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(n, ec.SECP256R1())


def sign_rs(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 signature as r || s (32 bytes each, big-endian), the quote format."""
    r, s = decode_dss_signature(key.sign(data, _ECDSA))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _xy(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cocoon-node test TEE"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    serial: int,
    not_after: datetime.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class SyntheticTee:
    """A test PKI plus an attestation key that sign quotes for chosen measurements."""

    #: The default image measurement of synthetic quotes.
    MRTD = hashlib.sha384(b"cocoon-node synthetic MRTD").digest()
    RTMRS = tuple(hashlib.sha384(b"cocoon-node synthetic RTMR%d" % i).digest() for i in range(4))

    def __init__(self, seed: bytes | None = None, *, leaf_not_after: datetime.datetime = _NOT_AFTER) -> None:
        seed = os.urandom(32) if seed is None else seed
        self.root_key = _derive(seed, "root")
        self.ca_key = _derive(seed, "platform-ca")
        self.leaf_key = _derive(seed, "pck-leaf")
        self.attestation_key = _derive(seed, "attestation-key")
        self.root_cert = _cert(
            "Test SGX Root CA",
            self.root_key,
            "Test SGX Root CA",
            self.root_key,
            ca=True,
            serial=1,
            not_after=_NOT_AFTER,
        )
        self.ca_cert = _cert(
            "Test SGX PCK Platform CA",
            self.ca_key,
            "Test SGX Root CA",
            self.root_key,
            ca=True,
            serial=2,
            not_after=_NOT_AFTER,
        )
        self.leaf_cert = _cert(
            "Test SGX PCK Certificate",
            self.leaf_key,
            "Test SGX PCK Platform CA",
            self.ca_key,
            ca=False,
            serial=3,
            not_after=leaf_not_after,
        )
        self.root = TrustedRoot("synthetic-test-root", self.root_cert, evaluate_tcb=False)
        self.chain_pem = _pem(self.leaf_cert) + _pem(self.ca_cert) + _pem(self.root_cert)

    @property
    def measurement(self) -> Measurement:
        """The allow-list entry of the default image."""
        r = self.RTMRS
        return Measurement(name="synthetic", mrtd=self.MRTD, rtmr0=r[0], rtmr1=r[1], rtmr2=r[2], rtmr3=r[3])

    def quote(
        self,
        report_data: bytes,
        *,
        version: int = 4,
        body_type: int = 2,
        mrtd: bytes | None = None,
        rtmrs: tuple[bytes, bytes, bytes, bytes] | None = None,
        td_attributes: bytes = bytes.fromhex("0000001000000000"),
        chain_pem: bytes | None = None,
        auth_data: bytes | None = None,
    ) -> bytes:
        """A signed quote whose REPORTDATA is ``report_data`` (64 bytes)."""
        if len(report_data) != 64:
            raise ValueError("REPORTDATA is 64 bytes")
        rt = self.RTMRS if rtmrs is None else rtmrs
        body = b"".join(
            (
                bytes.fromhex("06010300000000000000000000000000"),  # TEE_TCB_SVN
                hashlib.sha384(b"synthetic MRSEAM").digest(),  # MRSEAM
                bytes(48),  # MRSIGNERSEAM
                bytes(8),  # SEAMATTRIBUTES
                td_attributes,
                bytes.fromhex("e702060000000000"),  # XFAM
                self.MRTD if mrtd is None else mrtd,
                bytes(48 * 3),  # MRCONFIGID, MROWNER, MROWNERCONFIG
                *rt,
                report_data,
            )
        )
        if body_type == 3:
            body += bytes(16) + bytes(48)  # TEE_TCB_SVN2, MRSERVICETD
        header = struct.pack("<HHIHH", version, 2, TEE_TDX, 0, 0) + INTEL_QE_VENDOR_ID + bytes(20)
        signed = header + (body if version == 4 else struct.pack("<HI", body_type, len(body)) + body)
        att_pub = _xy(self.attestation_key)
        auth = os.urandom(32) if auth_data is None else auth_data
        qe_report = bytearray(QE_REPORT_LEN)
        qe_report[256:258] = (2).to_bytes(2, "little")  # ISVPRODID of the TD QE
        qe_report[320:352] = hashlib.sha256(att_pub + auth).digest()
        chain = self.chain_pem if chain_pem is None else chain_pem
        inner = b"".join(
            (
                bytes(qe_report),
                sign_rs(self.leaf_key, bytes(qe_report)),
                struct.pack("<H", len(auth)),
                auth,
                struct.pack("<HI", 5, len(chain)),
                chain,
            )
        )
        sig_data = sign_rs(self.attestation_key, signed) + att_pub + struct.pack("<HI", 6, len(inner)) + inner
        return signed + struct.pack("<I", len(sig_data)) + sig_data
