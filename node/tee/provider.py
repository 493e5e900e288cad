"""The worker's side of attestation: quotes, per-epoch keys and reports (trio shell).

:class:`ReportProvider` makes a fresh X25519 + Ed25519 key set and claims every
epoch (:meth:`ReportProvider.rotate`), gets evidence for them, and keeps the
last ``keep_epochs`` key sets so requests sealed to a just-superseded report
still open; older keys are dropped (forward secrecy across epochs).

Evidence by tier:

- ``tdx``: a quote with ``REPORTDATA = claims hash`` from a :class:`QuoteSource`:
  :class:`ConfigfsTsm` on a TDX guest (Linux >= 6.7 configfs-tsm: write
  ``inblob``, read ``outblob``; the directory is injectable, and tests use a
  fake one filled in by another process), or :class:`SyntheticQuoteSource`
  (the test TEE).  Collateral comes from an injectable fetcher
  (:func:`pccs_collateral` asks a PCCS through dcap-qvl; it needs the network).
- ``none``: no TEE; the claims are signed by the worker's identity key.  A
  consumer GPU has no confidential mode: its owner can read prompts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs
import dcap_qvl
import trio

from overlay import wire
from overlay.errors import AttestationError

from .claims import EpochKeys, new_epoch_keys
from .messages import MAX_QUOTE, AttestationReport, Claims, CollateralBundle
from .quote import parse_quote
from .synthetic import SyntheticTee
from .verifier import none_evidence_message

__all__ = [
    "TSM_REPORT_ROOT",
    "CollateralFetcher",
    "ConfigfsTsm",
    "EpochReport",
    "QuoteSource",
    "ReportProvider",
    "SyntheticQuoteSource",
    "make_none_report",
    "make_tdx_report",
    "pccs_collateral",
]

log = logging.getLogger(__name__)

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")

CollateralFetcher = Callable[[bytes], Awaitable[str]]  # raw quote -> QuoteCollateralV3 JSON


class QuoteSource(Protocol):
    """Where TDX quotes come from."""

    async def get_quote(self, report_data: bytes) -> bytes: ...


def make_none_report(claims: Claims, sign: Callable[[bytes], bytes]) -> AttestationReport:
    """A tier-``none`` report: the claims signed by the identity key (``Identity.sign``)."""
    return AttestationReport(
        tier="none", claims=claims, evidence=sign(none_evidence_message(claims)), collateral_ref=b""
    )


def make_tdx_report(claims: Claims, quote: bytes, collateral_json: str | None) -> AttestationReport:
    ref = b"" if collateral_json is None else hashlib.sha256(collateral_json.encode()).digest()
    return AttestationReport(tier="tdx", claims=claims, evidence=quote, collateral_ref=ref)


class ConfigfsTsm:
    """Quotes from the kernel's configfs-tsm report interface.

    ``root/entry`` is created if missing; writing 64 bytes to ``inblob`` and
    reading ``outblob`` yields a quote.  ``generation`` (when present) must
    advance by exactly one across our write and read, else another writer
    raced us and we retry.  Blocking file I/O runs in a worker thread.
    """

    def __init__(self, root: Path = TSM_REPORT_ROOT, entry: str = "cocoon-node", *, retries: int = 3) -> None:
        self.root = root
        self.entry = entry
        self.retries = retries

    @staticmethod
    def available(root: Path = TSM_REPORT_ROOT) -> bool:
        return root.is_dir()

    async def get_quote(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise AttestationError("bad_format", "REPORTDATA is 64 bytes")
        for _ in range(self.retries):
            quote = await trio.to_thread.run_sync(self._get_sync, report_data, abandon_on_cancel=True)
            if quote is not None:
                return quote
        raise AttestationError(
            "tsm_busy", f"configfs-tsm {self.root / self.entry}: raced {self.retries} times"
        )

    @staticmethod
    def _generation(d: Path) -> int | None:
        try:
            return int((d / "generation").read_text().strip())
        except (OSError, ValueError):
            return None

    def _get_sync(self, report_data: bytes) -> bytes | None:
        d = self.root / self.entry
        try:
            d.mkdir(exist_ok=True)
            provider = d / "provider"
            if provider.exists() and provider.read_text().strip() not in ("tdx_guest", ""):
                raise AttestationError(
                    "tsm_unavailable", f"provider {provider.read_text().strip()!r} is not TDX"
                )
            before = self._generation(d)
            (d / "inblob").write_bytes(report_data)
            with (d / "outblob").open("rb") as f:
                quote = f.read(MAX_QUOTE + 1)
            after = self._generation(d)
        except OSError as e:
            raise AttestationError("tsm_unavailable", f"configfs-tsm {d}: {e.strerror or e}") from e
        if before is not None and after is not None and after != before + 1:
            log.warning("configfs-tsm generation %s -> %s: another writer raced us", before, after)
            return None
        if len(quote) > MAX_QUOTE:
            raise AttestationError("oversized", f"quote from configfs-tsm over {MAX_QUOTE} bytes")
        return quote


@attrs.frozen
class SyntheticQuoteSource:
    """Quotes from the test TEE (tests and devnets; verifies only where its root is pinned)."""

    tee: SyntheticTee

    async def get_quote(self, report_data: bytes) -> bytes:
        return self.tee.quote(report_data)


async def pccs_collateral(quote: bytes, url: str = dcap_qvl.PHALA_PCCS_URL) -> str:
    """Collateral for a quote from a PCCS / Intel PCS (network; dcap-qvl runs its own event loop)."""

    def fetch() -> str:
        async def run() -> str:
            coll = await dcap_qvl.get_collateral(url, quote)
            return str(coll.to_json())

        return asyncio.run(run())

    try:
        return await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise AttestationError("collateral_missing", f"PCCS {url}: {e}") from e


@attrs.frozen
class EpochReport:
    """One epoch's keys and the report that vouches for them."""

    keys: EpochKeys
    report: AttestationReport
    raw: bytes  # wire.encode(report): what peers verify
    report_hash: bytes  # SHA-256(raw)
    collateral: CollateralBundle | None  # tdx only

    @property
    def epoch(self) -> int:
        return self.keys.claims.epoch


class ReportProvider:
    """Makes and rotates the worker's attestation report; looks keys up for SealedStream.accept."""

    def __init__(
        self,
        *,
        peer_id: str,
        sign: Callable[[bytes], bytes],
        model_id: str,
        model_hash: bytes,
        quote_source: QuoteSource | None = None,
        collateral: CollateralFetcher | None = None,
        keep_epochs: int = 2,
        gpu_evidence_hash: bytes = b"",
    ) -> None:
        self.peer_id = peer_id
        self._sign = sign
        self.model_id = model_id
        self.model_hash = model_hash
        self.quote_source = quote_source
        self.collateral = collateral
        self.keep_epochs = keep_epochs
        self.gpu_evidence_hash = gpu_evidence_hash
        self._reports: dict[int, EpochReport] = {}

    @classmethod
    def detect(
        cls,
        *,
        peer_id: str,
        sign: Callable[[bytes], bytes],
        model_id: str,
        model_hash: bytes,
        tsm_root: Path = TSM_REPORT_ROOT,
        collateral: CollateralFetcher | None = pccs_collateral,
        keep_epochs: int = 2,
    ) -> ReportProvider:
        """Tier ``tdx`` through configfs-tsm when ``tsm_root`` exists, else tier ``none``."""
        source = ConfigfsTsm(tsm_root) if ConfigfsTsm.available(tsm_root) else None
        if source is None:
            log.warning(
                "attestation tier none: no TEE here, so whoever runs this machine can read prompts "
                "(sealing still hides them from proxies and the network)",
                extra={"peer_id": peer_id},
            )
        else:
            log.info("attestation tier tdx via configfs-tsm at %s", tsm_root, extra={"peer_id": peer_id})
        return cls(
            peer_id=peer_id,
            sign=sign,
            model_id=model_id,
            model_hash=model_hash,
            quote_source=source,
            collateral=collateral if source else None,
            keep_epochs=keep_epochs,
        )

    @property
    def tier(self) -> str:
        return "none" if self.quote_source is None else "tdx"

    @property
    def current(self) -> EpochReport | None:
        return self._reports[max(self._reports)] if self._reports else None

    async def rotate(self, *, epoch: int, beacon: bytes, now: int, lifetime: int) -> EpochReport:
        """New keys and report for ``epoch``; valid from ``now`` for ``lifetime`` seconds."""
        keys = new_epoch_keys(
            tier=self.tier,
            peer_id=self.peer_id,
            model_id=self.model_id,
            model_hash=self.model_hash,
            epoch=epoch,
            epoch_beacon=beacon,
            issued_at=now,
            not_after=now + lifetime,
            gpu_evidence_hash=self.gpu_evidence_hash,
        )
        bundle: CollateralBundle | None = None
        if self.quote_source is None:
            report = make_none_report(keys.claims, self._sign)
        else:
            quote = await self.quote_source.get_quote(keys.claims_hash)
            if parse_quote(quote).td.report_data != keys.claims_hash:
                raise AttestationError("reportdata_mismatch", "the quote source ignored our REPORTDATA")
            if self.collateral is not None:
                bundle = CollateralBundle(json=await self.collateral(quote))
            report = make_tdx_report(keys.claims, quote, None if bundle is None else bundle.json)
        raw = wire.encode(report)
        er = EpochReport(keys, report, raw, hashlib.sha256(raw).digest(), bundle)
        self._reports[epoch] = er
        for old in [e for e in self._reports if e < epoch - self.keep_epochs]:
            del self._reports[old]  # forward secrecy: the old X25519 key is gone
        log.info("attestation report for epoch %d (%s)", epoch, self.tier, extra={"peer_id": self.peer_id})
        return er

    def keys_for(self, claims_hash: bytes) -> EpochKeys | None:
        """The epoch keys whose claims hash is ``claims_hash`` (``SealedStream.accept``'s lookup)."""
        for er in self._reports.values():
            if er.keys.claims_hash == claims_hash:
                return er.keys
        return None

    def report_for(self, report_hash: bytes) -> EpochReport | None:
        """A held report by hash (to answer a ReportRequest)."""
        for er in self._reports.values():
            if er.report_hash == report_hash:
                return er
        return None
