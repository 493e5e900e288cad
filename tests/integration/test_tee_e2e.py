"""End to end over real libp2p on loopback: fetch a worker's report, verify it, seal a request to it.

The worker runs the test TEE (synthetic TDX quotes; no TDX hardware here), so the client pins the
test root; everything else is the production path.
"""

from __future__ import annotations

import hashlib
from contextlib import AsyncExitStack

import attrs
import pytest
import trio

from node.tee import (
    AttestationReport,
    ClientPolicy,
    ReplayGuard,
    ReportChecker,
    ReportProvider,
    SealedStream,
    SyntheticQuoteSource,
    SyntheticTee,
    TdxVerifier,
    TeePolicy,
    Verifier,
)
from overlay import wire
from overlay.errors import AttestationError
from overlay.host import OverlaySettings, open_overlay
from overlay.identity import Identity
from overlay.streams import FramedStream

REPORT_PROTO = "/cocoon-test/tee-report/1"
SEALED_PROTO = "/cocoon-test/tee-sealed/1"
SEED = b"e2e-test-tee".ljust(32, b"\0")
NOW = 1_800_000_000
BEACON = hashlib.sha256(b"beacon").digest()


@wire.message(396)
@attrs.frozen
class _Text:
    text: str


async def _serve_worker(
    ov: object, provider: ReportProvider, report_of: ReportProvider | None = None
) -> None:
    guard = ReplayGuard()

    async def report(stream: FramedStream) -> None:
        current = (report_of or provider).current
        assert current is not None
        await stream.send(current.report)

    async def sealed(stream: FramedStream) -> None:
        s = await SealedStream.accept(stream, provider.keys_for, replay=guard)
        prompt = await s.receive()
        assert isinstance(prompt, _Text)
        for word in ("echo:", *prompt.text.split()):
            await s.send(_Text(word))
        await s.aclose()

    ov.set_stream_handler(REPORT_PROTO, report)  # type: ignore[attr-defined]
    ov.set_stream_handler(SEALED_PROTO, sealed)  # type: ignore[attr-defined]


def _checker() -> ReportChecker:
    tee = SyntheticTee(SEED)
    policy = TeePolicy(seq=1, issued_at=0, not_after=NOW * 2, measurements=(tee.measurement,))
    verifier = Verifier(tdx=TdxVerifier(policy=policy, roots=(tee.root,)))
    return ReportChecker(verifier, ClientPolicy(min_tier="tdx", max_epoch_age=1))


@pytest.mark.slow
async def test_client_verifies_and_seals_over_libp2p() -> None:
    settings = OverlaySettings(gossip=False)
    w_ident, w2_ident = Identity.generate(), Identity.generate()
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(open_overlay(w_ident, settings))
        impostor = await stack.enter_async_context(open_overlay(w2_ident, settings))
        client = await stack.enter_async_context(open_overlay(Identity.generate(), settings))
        provider = ReportProvider(
            peer_id=worker.peer_id,
            sign=w_ident.sign,
            model_id="tiny",
            model_hash=bytes(32),
            quote_source=SyntheticQuoteSource(SyntheticTee(SEED)),
        )
        await provider.rotate(epoch=9, beacon=BEACON, now=NOW, lifetime=600)
        await _serve_worker(worker, provider)
        await _serve_worker(impostor, provider, report_of=provider)  # replays the real worker's report
        checker = _checker()
        with trio.fail_after(30):
            for peer, ov in ((worker.peer_id, worker), (impostor.peer_id, impostor)):
                await client.connect(f"{ov.listen_addrs()[0]}/p2p/{peer}")
            stream = await client.open_stream(worker.peer_id, REPORT_PROTO)
            raw = wire.encode(await stream.receive_as(AttestationReport))
            verified = checker.check(raw, peer_id=worker.peer_id, now=NOW + 5, epoch=9)
            assert verified.tier == "tdx"

            sealed = SealedStream.client(
                await client.open_stream(worker.peer_id, SEALED_PROTO), verified.claims
            )
            await sealed.send(_Text("attack at dawn"))
            words = [m.text async for m in sealed]  # type: ignore[attr-defined]
            await sealed.aclose()
            assert words == ["echo:", "attack", "at", "dawn"]

            stream = await client.open_stream(impostor.peer_id, REPORT_PROTO)
            stolen = wire.encode(await stream.receive_as(AttestationReport))
            with pytest.raises(AttestationError) as info:
                checker.check(stolen, peer_id=impostor.peer_id, now=NOW + 5, epoch=9)
            assert info.value.reason == "wrong_peer"
