"""Trust anchors: the pinned root certificates quotes must chain to.

A verifier trusts only the roots it is given, never the root a quote carries.
:data:`INTEL_SGX_ROOT` is Intel's SGX Root CA (P-256, 2018-05-21 .. 2049-12-31,
SHA-256 ``44a0196b…74d3``; its key id SHA-384(0x04 || X || Y) is Cocoon's pin).
A test root (see :mod:`node.tee.testtee`) is pinned only in tests and devnets;
it has no TCB collateral, so ``evaluate_tcb`` is False for it.
"""

from __future__ import annotations

import hashlib

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["INTEL_ROOT_KEY_ID", "INTEL_ROOT_SHA256", "INTEL_SGX_ROOT", "TrustedRoot"]

_INTEL_ROOT_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""
INTEL_ROOT_SHA256 = bytes.fromhex("44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")
INTEL_ROOT_KEY_ID = bytes.fromhex(
    "46e403bd34f05a3f2817ab9badcaacc7ffc98e0f261008cd30dae936cace18d5dcf58eef31463613de1570d516200993"
)


@attrs.frozen
class TrustedRoot:
    """A pinned root CA. ``evaluate_tcb``: quotes under it get dcap-qvl's full TCB evaluation."""

    name: str
    cert: x509.Certificate = attrs.field(eq=False)
    evaluate_tcb: bool
    der: bytes = attrs.field(init=False)
    key_id: bytes = attrs.field(init=False)  # SHA-384 of the uncompressed public point

    def __attrs_post_init__(self) -> None:
        key = self.cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"root {self.name} is not an EC key")
        point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        object.__setattr__(self, "der", self.cert.public_bytes(serialization.Encoding.DER))
        object.__setattr__(self, "key_id", hashlib.sha384(point).digest())

    @classmethod
    def from_pem(cls, name: str, pem: bytes, *, evaluate_tcb: bool) -> TrustedRoot:
        return cls(name, x509.load_pem_x509_certificate(pem), evaluate_tcb)

    @classmethod
    def from_der(cls, name: str, der: bytes, *, evaluate_tcb: bool) -> TrustedRoot:
        return cls(name, x509.load_der_x509_certificate(der), evaluate_tcb)


INTEL_SGX_ROOT = TrustedRoot.from_pem("intel-sgx-root", _INTEL_ROOT_PEM, evaluate_tcb=True)
