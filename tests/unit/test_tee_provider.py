"""The worker's report: configfs-tsm against a fake configfs filled in by another process; epoch rotation."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import trio

from node.tee import (
    ConfigfsTsm,
    ReportProvider,
    SyntheticQuoteSource,
    SyntheticTee,
    TdxVerifier,
    TeePolicy,
    Verifier,
)
from overlay.errors import AttestationError
from overlay.identity import Identity

SEED = b"fake-configfs-tee".ljust(32, b"\0")
NOW = 1_800_000_000
IDENT = Identity.from_seed(hashlib.sha256(b"worker").digest())
BEACON = hashlib.sha256(b"epoch beacon").digest()

# The fake kernel, another process.  `inblob` and `outblob` are FIFOs, so it needs no polling: it
# blocks until the worker writes `inblob`, bumps `generation`, then blocks until the worker opens
# `outblob` (as a read of the real outblob blocks while the quote is generated) and writes the quote.
FAKE_TSM = """
import sys
from pathlib import Path
from node.tee.synthetic import SyntheticTee
d, seed, count, mode = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tee = SyntheticTee(seed)
for _ in range(count):
    report_data = (d / "inblob").read_bytes()
    with open(d / "requests.log", "ab") as log:
        log.write(report_data)
    gen = int((d / "generation").read_text())
    (d / "generation").write_text(str(gen + (2 if mode == "race" else 1)))
    if mode == "wrong":
        report_data = bytes(64)
    with open(d / "outblob", "wb") as out:
        out.write(tee.quote(report_data))
"""


def _fake_configfs(root: Path) -> Path:
    entry = root / "cocoon-node"
    entry.mkdir(parents=True)
    (entry / "generation").write_text("0")
    (entry / "provider").write_text("tdx_guest\n")
    os.mkfifo(entry / "inblob")
    os.mkfifo(entry / "outblob")
    return entry


def _fake_cmd(entry: Path, count: int, mode: str = "ok") -> list[str]:
    return [sys.executable, "-c", FAKE_TSM, str(entry), SEED.hex(), str(count), mode]


def _provider(source: object, **kw: object) -> ReportProvider:
    return ReportProvider(
        peer_id=IDENT.peer_id,
        sign=IDENT.sign,
        model_id="tiny",
        model_hash=hashlib.sha256(b"weights").digest(),
        quote_source=source,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _verifier() -> Verifier:
    tee = SyntheticTee(SEED)  # the same seed as the fake process: the same test root key
    policy = TeePolicy(seq=1, issued_at=0, not_after=NOW * 2, measurements=(tee.measurement,))
    return Verifier(tdx=TdxVerifier(policy=policy, roots=(tee.root,)))


async def test_configfs_tsm_report_rotates_each_epoch(tmp_path: Path) -> None:
    entry = _fake_configfs(tmp_path)
    provider = _provider(ConfigfsTsm(tmp_path), keep_epochs=1)
    assert provider.tier == "tdx"
    verifier = _verifier()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.run_process, _fake_cmd(entry, 3))
            reports = []
            for epoch in (1, 2, 3):
                er = await provider.rotate(epoch=epoch, beacon=BEACON, now=NOW + epoch, lifetime=600)
                assert (entry / "requests.log").read_bytes()[-64:] == er.keys.claims_hash
                assert (entry / "generation").read_text() == str(epoch)
                vr = verifier.check(er.raw, now=NOW + epoch, peer_id=IDENT.peer_id)
                assert vr.claims.epoch == epoch
                assert vr.claims.enc_pk == er.keys.claims.enc_pk
                reports.append(er)
    assert len({er.keys.claims.enc_pk for er in reports}) == 3  # a fresh X25519 key every epoch
    assert provider.current is reports[2]
    assert provider.keys_for(reports[0].keys.claims_hash) is None  # forgotten: forward secrecy
    assert provider.keys_for(reports[1].keys.claims_hash) is reports[1].keys
    assert provider.report_for(reports[2].report_hash) is reports[2]
    assert provider.report_for(reports[0].report_hash) is None


async def test_configfs_tsm_race_and_ignored_reportdata(tmp_path: Path) -> None:
    entry = _fake_configfs(tmp_path)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.run_process, _fake_cmd(entry, 3, "race"))
            with pytest.raises(AttestationError) as info:
                await ConfigfsTsm(tmp_path, retries=3).get_quote(bytes(range(64)))
            assert info.value.reason == "tsm_busy"
    entry2 = _fake_configfs(tmp_path / "two")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.run_process, _fake_cmd(entry2, 1, "wrong"))
            with pytest.raises(AttestationError) as info:
                await _provider(ConfigfsTsm(tmp_path / "two")).rotate(
                    epoch=1, beacon=BEACON, now=NOW, lifetime=60
                )
            assert info.value.reason == "reportdata_mismatch"


async def test_configfs_tsm_unusable(tmp_path: Path) -> None:
    entry = tmp_path / "cocoon-node"
    entry.mkdir()
    (entry / "provider").write_text("sev_guest\n")
    with pytest.raises(AttestationError) as info:
        await ConfigfsTsm(tmp_path).get_quote(bytes(64))
    assert info.value.reason == "tsm_unavailable"
    with pytest.raises(AttestationError) as info:
        await ConfigfsTsm(tmp_path / "missing" / "deeper").get_quote(bytes(64))
    assert info.value.reason == "tsm_unavailable"
    with pytest.raises(AttestationError) as info:
        await ConfigfsTsm(tmp_path).get_quote(b"short")
    assert info.value.reason == "bad_format"


async def test_detect_picks_the_tier(tmp_path: Path) -> None:
    kw = {"peer_id": IDENT.peer_id, "sign": IDENT.sign, "model_id": "m", "model_hash": bytes(32)}
    assert ReportProvider.detect(tsm_root=tmp_path / "absent", **kw).tier == "none"  # type: ignore[arg-type]
    tdx = ReportProvider.detect(tsm_root=tmp_path, **kw)  # type: ignore[arg-type]
    assert tdx.tier == "tdx"
    assert isinstance(tdx.quote_source, ConfigfsTsm)


async def test_none_tier_report_is_signed_by_the_identity() -> None:
    provider = _provider(None)
    assert provider.tier == "none"
    assert provider.current is None
    er = await provider.rotate(epoch=5, beacon=BEACON, now=NOW, lifetime=600)
    assert er.report.collateral_ref == b""
    assert er.collateral is None
    vr = Verifier().check(er.raw, now=NOW, peer_id=IDENT.peer_id)
    assert (vr.tier, vr.status, vr.claims.epoch) == ("none", "none", 5)


async def test_synthetic_source_with_collateral_fetcher() -> None:
    fetched: list[bytes] = []

    async def fetch(quote: bytes) -> str:
        fetched.append(quote)
        return '{"bundle": 1}'

    provider = _provider(SyntheticQuoteSource(SyntheticTee(SEED)), collateral=fetch)
    er = await provider.rotate(epoch=1, beacon=BEACON, now=NOW, lifetime=600)
    assert fetched == [er.report.evidence]
    assert er.collateral is not None
    assert er.report.collateral_ref == hashlib.sha256(b'{"bundle": 1}').digest()
    assert _verifier().check(er.raw, now=NOW).root == "synthetic-test-root"  # a test root needs no collateral
