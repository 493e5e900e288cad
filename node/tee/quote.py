"""Intel TDX quote parser (v4 and v5), pure and total.

Layout (little-endian; Intel TDX DCAP Quoting Library API, go-tdx-guest
``abi/abi.go``)::

    v4:  header(48) || TD report body(584)                      || u32 len || signature data
    v5:  header(48) || u16 body_type || u32 body_size || body    || u32 len || signature data
         body_type 2 = TD 1.0 (584 bytes), 3 = TD 1.5 (648 bytes)

    header:  version u16 | att_key_type u16 | tee_type u32 | qe_svn u16 | pce_svn u16
             | qe_vendor_id (16) | user_data (20)
    signature data:  quote signature r||s (64) | attestation key x||y (64)
             | u16 cert_type = 6 | u32 size | QE report (384) | QE report signature (64)
             | u16 auth_len | QE auth data | u16 cert_type = 5 | u32 size | PEM PCK chain

The quote signature covers everything before the u32 signature length.
:func:`parse_quote` raises only :class:`~overlay.errors.AttestationError`
(reasons ``oversized``, ``wrong_version``, ``bad_format``) on any input; it
checks structure, never signatures (see :mod:`node.tee.pki`).
"""

from __future__ import annotations

import struct

import attrs

from overlay.errors import AttestationError

from .messages import MAX_QUOTE

__all__ = [
    "ATT_KEY_ECDSA_P256",
    "HEADER_LEN",
    "INTEL_QE_VENDOR_ID",
    "MAX_AUTH_DATA",
    "MAX_CHAIN",
    "QE_REPORT_LEN",
    "REPORT_DATA_OFFSET",
    "TD10_LEN",
    "TD15_LEN",
    "TEE_TDX",
    "QeReport",
    "Quote",
    "TdReport",
    "parse_quote",
]

HEADER_LEN = 48
TD10_LEN = 584
TD15_LEN = 648
QE_REPORT_LEN = 384
REPORT_DATA_OFFSET = HEADER_LEN + 520  # absolute offset of REPORTDATA in a v4 quote
TEE_TDX = 0x81
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_QE_REPORT = 6
CERT_PCK_CHAIN = 5
MAX_CHAIN = 8 * 1024  # bytes: the PEM PCK chain (Intel's is ~3.7 KB)
MAX_AUTH_DATA = 256  # bytes: QE authentication data (32 in practice)
_BODY_TYPES = {2: TD10_LEN, 3: TD15_LEN}


@attrs.frozen
class TdReport:
    """The TD report body (TD 1.0 fields, plus the two TD 1.5 fields when present)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes  # byte 0 bit 0 = DEBUG
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes = b""  # TD 1.5 only
    mr_service_td: bytes = b""  # TD 1.5 only

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & 1)


@attrs.frozen
class QeReport:
    """The Quoting Enclave's SGX report (384 bytes), signed by the PCK leaf."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@attrs.frozen
class Quote:
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int  # 2 = TD 1.0, 3 = TD 1.5 (v4 quotes are always 2)
    td: TdReport
    signed_data: bytes  # the bytes the quote signature covers
    signature: bytes  # r || s, 64 bytes big-endian
    attestation_key: bytes  # x || y, 64 bytes
    qe_report: QeReport
    qe_report_signature: bytes  # r || s by the PCK leaf key
    qe_auth_data: bytes
    pck_chain_pem: bytes


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise AttestationError("bad_format", f"quote truncated in {what} (at byte {self.pos})")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self, what: str) -> int:
        v: int = struct.unpack("<H", self.take(2, what))[0]
        return v

    def u32(self, what: str) -> int:
        v: int = struct.unpack("<I", self.take(4, what))[0]
        return v


def _td_report(body: bytes) -> TdReport:
    def f(off: int, n: int) -> bytes:
        return body[off : off + n]

    return TdReport(
        tee_tcb_svn=f(0, 16),
        mr_seam=f(16, 48),
        mr_signer_seam=f(64, 48),
        seam_attributes=f(112, 8),
        td_attributes=f(120, 8),
        xfam=f(128, 8),
        mr_td=f(136, 48),
        mr_config_id=f(184, 48),
        mr_owner=f(232, 48),
        mr_owner_config=f(280, 48),
        rtmr=(f(328, 48), f(376, 48), f(424, 48), f(472, 48)),
        report_data=f(520, 64),
        tee_tcb_svn2=f(584, 16) if len(body) == TD15_LEN else b"",
        mr_service_td=f(600, 48) if len(body) == TD15_LEN else b"",
    )


def _qe_report(raw: bytes) -> QeReport:
    return QeReport(
        raw=raw,
        cpu_svn=raw[0:16],
        misc_select=int.from_bytes(raw[16:20], "little"),
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        isv_prod_id=int.from_bytes(raw[256:258], "little"),
        isv_svn=int.from_bytes(raw[258:260], "little"),
        report_data=raw[320:384],
    )


def parse_quote(data: bytes) -> Quote:
    """Parse a TDX quote; raises AttestationError (oversized / wrong_version / bad_format) only."""
    if not isinstance(data, bytes):
        raise AttestationError("bad_format", "a quote is bytes")
    if len(data) > MAX_QUOTE:
        raise AttestationError("oversized", f"quote of {len(data)} bytes over the {MAX_QUOTE} limit")
    r = _Reader(data)
    version = r.u16("header")
    key_type = r.u16("header")
    tee_type = r.u32("header")
    qe_svn = r.u16("header")
    pce_svn = r.u16("header")
    vendor = r.take(16, "header")
    user_data = r.take(20, "header")
    if version not in (4, 5):
        raise AttestationError("wrong_version", f"quote version {version}, we accept 4 and 5")
    if tee_type != TEE_TDX:
        raise AttestationError("bad_format", f"tee_type {tee_type:#x} is not TDX")
    if key_type != ATT_KEY_ECDSA_P256:
        raise AttestationError("bad_format", f"attestation key type {key_type} is not ECDSA-P256")
    if vendor != INTEL_QE_VENDOR_ID:
        raise AttestationError("bad_format", "unknown QE vendor id")
    if version == 4:
        body_type = 2
        body = r.take(TD10_LEN, "TD report")
    else:
        body_type = r.u16("v5 body type")
        body_size = r.u32("v5 body size")
        expected = _BODY_TYPES.get(body_type)
        if expected is None:
            raise AttestationError("bad_format", f"v5 body type {body_type} is not a supported TD report")
        if body_size != expected:
            raise AttestationError(
                "bad_format", f"v5 body size {body_size}, type {body_type} needs {expected}"
            )
        body = r.take(body_size, "TD report")
    signed_end = r.pos
    sig_len = r.u32("signature length")
    sig_end = r.pos + sig_len
    if sig_end > len(data):
        raise AttestationError("bad_format", "signature data runs past the end of the quote")
    if any(data[sig_end:]):
        raise AttestationError("bad_format", "non-zero bytes after the signature data")
    s = _Reader(data[:sig_end], r.pos)
    signature = s.take(64, "quote signature")
    att_key = s.take(64, "attestation key")
    cert_type = s.u16("certification data type")
    if cert_type != CERT_QE_REPORT:
        raise AttestationError("bad_format", f"certification data type {cert_type}, expected 6")
    cert_size = s.u32("certification data size")
    if s.pos + cert_size != sig_end:
        raise AttestationError("bad_format", "certification data size disagrees with the signature length")
    qe_raw = s.take(QE_REPORT_LEN, "QE report")
    qe_sig = s.take(64, "QE report signature")
    auth_len = s.u16("QE auth data length")
    if auth_len > MAX_AUTH_DATA:
        raise AttestationError("oversized", f"QE auth data of {auth_len} bytes")
    auth = s.take(auth_len, "QE auth data")
    inner_type = s.u16("PCK certification data type")
    if inner_type != CERT_PCK_CHAIN:
        raise AttestationError("bad_format", f"PCK certification data type {inner_type}, expected 5")
    chain_size = s.u32("PCK chain size")
    if chain_size > MAX_CHAIN:
        raise AttestationError("oversized", f"PCK certificate chain of {chain_size} bytes over {MAX_CHAIN}")
    if s.pos + chain_size != sig_end:
        raise AttestationError("bad_format", "PCK chain size disagrees with the certification data size")
    chain = s.take(chain_size, "PCK chain")
    return Quote(
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=vendor,
        user_data=user_data,
        body_type=body_type,
        td=_td_report(body),
        signed_data=data[:signed_end],
        signature=signature,
        attestation_key=att_key,
        qe_report=_qe_report(qe_raw),
        qe_report_signature=qe_sig,
        qe_auth_data=auth,
        pck_chain_pem=chain,
    )
