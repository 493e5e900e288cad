"""The market over real libp2p hosts on loopback: election, offer gossip, heartbeats, matching.

One bootstrap node, 3 proxy candidates, 6 workers offering the tiny model and 2
clients, each a real :class:`overlay.host.Overlay` (Noise, yamux, Kademlia,
gossipsub) in this process.  Epochs are a few seconds long so that an election
happens during the test.  Stake comes from an in-process ``StakeTable`` (the
chain backend's per-epoch snapshot; the real chain is the TON package's
business) and the epoch seed from the fixed test function.

The workers serve generations with the real generation service and the real
CPU engine on the tiny model; to keep the test light the six workers share one
loaded engine (each through its own libp2p host and stream handler).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import pytest
import trio

from inference.cpu import TorchEngine
from inference.messages import FinalChunk, GenerateRequest
from inference.service import PROTOCOL_ID as GENERATE_PROTOCOL
from inference.service import GenerationService, generate
from inference.tiny import write_tiny_model
from market.client import MarketClient
from market.core import ElectionView
from market.directory import Candidate, Directory, ProxyRef
from market.election import ElectionParams, EpochClock
from market.pricing import PricingPolicy, WorkerProfile
from market.protocols import CANDIDACY_TOPIC, MarketOverlay, MarketSettings, offer_topic
from market.records import UsageReport
from market.reputation import Reputation
from market.service import ProxyService, WorkerLoadSample, WorkerService
from market.testing import fixed_epoch_seed, ton_address
from market.validation import StakeTable
from overlay.host import Overlay
from overlay.identity import Identity
from tests.helpers import start_bootstrap, start_nodes

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-test"
SETTINGS = MarketSettings(
    refresh=20.0,
    lifetime=60.0,
    tick=0.5,
    heartbeat=0.5,
    stats_every=2.0,
    announce_every=1.0,
    request_timeout=5.0,
)


def _model_hash(directory: Path) -> bytes:
    import hashlib

    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        h.update((directory / name).read_bytes())
    return h.digest()


def _stake_of(amount: int) -> Callable[[int], int]:
    return lambda epoch: amount


def _has_elected(d: Directory) -> Callable[[], bool]:
    return lambda: bool(d.elected())


def _holds_offers_of(proxy: ProxyService, workers: set[str]) -> Callable[[], bool]:
    return lambda: workers <= {r.body.peer_id for r in proxy.core.book.offers(MODEL, time.time())}


def _has_load_of(proxy: ProxyService, worker: str) -> Callable[[], bool]:
    return lambda: proxy.core.book.load_of(worker) is not None


def _has_reputation(rep: Reputation, worker: str) -> Callable[[], bool]:
    return lambda: rep.entry(worker) is not None


def _typed(ov: Overlay) -> MarketOverlay:
    return ov  # the real overlay satisfies the market's Protocol (checked by mypy on this line)


async def test_proxies_are_elected_offers_flow_and_clients_get_matches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    write_tiny_model(tmp_path / "tiny")
    model_hash = _model_hash(tmp_path / "tiny")
    stakes = StakeTable()
    engine = TorchEngine(
        tmp_path / "tiny", model_id=MODEL, weights="fp32", slots=4, context=256, threads=1, seed=7
    )
    await engine.load()
    generation = GenerationService({MODEL: engine})
    async with AsyncExitStack() as stack:
        stack.push_async_callback(engine.close)
        boot = await start_bootstrap(stack)
        overlays = await start_nodes(stack, 11, boot)
        cand_ovs, worker_ovs, client_ovs = overlays[:3], overlays[3:9], overlays[9:]
        everyone = [boot, *overlays]

        # Short epochs, starting now: candidacies for epoch 2 are due by the start of epoch 1.
        now = time.time()
        clock = EpochClock(genesis=now - 0.5, length=4.0, lead=4.0, overlap=1.0)
        params = ElectionParams(k=2, max_per_operator=2)

        def view() -> ElectionView:
            return ElectionView(clock, fixed_epoch_seed, stakes, params=params)

        async with trio.open_nursery() as nursery:
            dirs: dict[str, Directory] = {}
            for i, ov in enumerate(everyone):
                candidate = None
                if ov in cand_ovs:
                    stake = Identity.generate()
                    address = ton_address(stake.public_key)
                    stakes.set_key(address, stake.public_key)
                    for epoch in range(-1, 40):
                        stakes.set_stake(address, epoch, 10**9 * (i + 1))
                    candidate = Candidate(stake, address, f"operator-{i}", _stake_of(10**9 * (i + 1)))
                d = Directory(
                    _typed(ov), ov.identity, view(), dht=ov.dht, candidate=candidate, settings=SETTINGS
                )
                dirs[ov.peer_id] = d
                await nursery.start(d.run)
            proxies = {}
            for ov in cand_ovs:
                p = ProxyService(ov, ov.identity, dirs[ov.peer_id], models=(MODEL,), settings=SETTINGS)
                proxies[ov.peer_id] = p
                await nursery.start(p.run)
            rng = random.Random(5)
            workers = []
            for ov in worker_ovs:
                addrs = tuple(a.rsplit("/p2p/", 1)[0] for a in ov.listen_addrs())
                profile = WorkerProfile(
                    ov.peer_id, ov.identity.public_key, addrs, MODEL, model_hash, capacity=4,
                    max_context=2048, decode_tok_s=rng.uniform(20, 80),
                )  # fmt: skip
                floor = rng.randint(50, 150)
                w = WorkerService(
                    ov, ov.identity, profile, PricingPolicy(floor, 4 * floor), dirs[ov.peer_id],
                    load=WorkerLoadSample, settings=SETTINGS,
                )  # fmt: skip
                workers.append(w)
                ov.set_stream_handler(GENERATE_PROTOCOL, generation.handle)
                await nursery.start(w.run)

            # Gossip meshes form (heartbeat 1 s), then the election of epoch 2 happens everywhere.
            with trio.fail_after(30):
                for ov in everyone:
                    await ov.wait_topic_peers(CANDIDACY_TOPIC, 1)
                for d in dirs.values():
                    await d.wait_until(_has_elected(d))
            now = time.time()
            sets = {tuple(p.peer_id for p in d.elected(now)) for d in dirs.values()}
            assert len(sets) == 1, sets
            (elected,) = sets
            assert len(elected) == 2
            assert set(elected) <= {ov.peer_id for ov in cand_ovs}

            # Every worker's offer reaches every proxy's book.  Epochs last 4 s and each elects
            # 2 of the 3 candidates afresh, so any of them may be a client's proxy later on.
            worker_ids = {ov.peer_id for ov in worker_ovs}
            with trio.fail_after(30):
                for p in proxies.values():
                    await p.wait_until(_holds_offers_of(p, worker_ids))
            # Heartbeats: each worker heartbeats its proxies among the elected ones, and they answer.
            with trio.fail_after(20):
                for w, ov in zip(workers, worker_ovs, strict=True):
                    mine = [p for p in dirs[ov.peer_id].proxies_for(ov.peer_id) if p.peer_id in proxies]
                    await proxies[mine[0].peer_id].wait_until(
                        _has_load_of(proxies[mine[0].peer_id], ov.peer_id)
                    )
                    await w.wait_heartbeats_acked()

            # Both clients get matches from their proxy, checked by the client itself.
            for ov in client_ovs:
                client = MarketClient(ov, dirs[ov.peer_id], settings=SETTINGS)
                first = clock.epoch_of(time.time())
                with trio.fail_after(15):
                    match = await client.match(
                        MODEL, max_price_prompt=10_000, max_price_completion=10_000, count=6
                    )
                # The proxy was elected for an epoch during the call (the set may have rotated).
                seen = dirs[ov.peer_id].view
                during = range(first, clock.epoch_of(time.time()) + 1)
                assert match.proxy in {p.peer_id for e in during for p in seen.proxies(e)}
                assert {r.body.peer_id for r in match.offers} <= worker_ids
                assert len(match.offers) >= 3
                stats = await client.stats(MODEL)
                assert stats.body.live_offers == 6

                # ... and a generation from the chosen worker, straight from the worker (not via the proxy).
                offer = match.offers[0].body
                request = GenerateRequest(
                    f"req-{ov.peer_id[-6:]}", MODEL, 8, prompt="The capital of France is",
                    temperature=0.0, ignore_eos=True,
                )  # fmt: skip
                with trio.fail_after(30):
                    stream = await ov.open_stream(offer.peer_id, GENERATE_PROTOCOL, addrs=offer.addrs)
                    chunks = [c async for c in generate(stream, request)]
                final = chunks[-1]
                assert isinstance(final, FinalChunk)
                assert final.completion_tokens == 8
                await client.report(match.proxy, UsageReport(offer.peer_id, True, 8, 8))
                rep = proxies[match.proxy].core.reputation
                with trio.fail_after(10):
                    await proxies[match.proxy].wait_until(_has_reputation(rep, offer.peer_id))
            assert all(ov.statistics().rejected == 0 for ov in everyone)
            assert offer_topic(MODEL) in cand_ovs[0].statistics().topics
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.name.startswith("market")]


async def test_attested_worker_is_endorsed_and_an_impostor_is_not(caplog: pytest.LogCaptureFixture) -> None:
    """Tier tdx through the market with the real verifier (node.tee) and the test TEE (no TDX here)."""
    from node.tee import ReportProvider, SyntheticQuoteSource, SyntheticTee, TdxVerifier, TeePolicy, Verifier

    caplog.set_level(logging.ERROR)
    tee = SyntheticTee(b"market-test-tee".ljust(32, b"\0"))
    policy = TeePolicy(
        seq=1, issued_at=0, not_after=int(time.time()) + 86_400, measurements=(tee.measurement,)
    )
    verifier = Verifier(tdx=TdxVerifier(policy=policy, roots=(tee.root,)))
    model_hash = bytes(range(32))
    settings = attrs.evolve(SETTINGS, refresh=1.0)
    async with AsyncExitStack() as stack:
        boot = await start_bootstrap(stack)
        honest_ov, impostor_ov, client_ov = await start_nodes(stack, 3, boot)
        provider = ReportProvider(
            peer_id=honest_ov.peer_id, sign=honest_ov.identity.sign, model_id=MODEL, model_hash=model_hash,
            quote_source=SyntheticQuoteSource(tee),
        )  # fmt: skip
        await provider.rotate(epoch=1, beacon=bytes(32), now=int(time.time()), lifetime=600)
        assert provider.current is not None
        report = provider.current.raw
        clock = EpochClock(genesis=0.0, length=3600.0, lead=3600.0, overlap=300.0)
        boot_addrs = tuple(a.rsplit("/p2p/", 1)[0] for a in boot.listen_addrs())
        boot_ref = (ProxyRef(boot.peer_id, boot_addrs),)

        def directory(ov: Overlay) -> Directory:
            view = ElectionView(clock, fixed_epoch_seed, StakeTable())
            return Directory(ov, ov.identity, view, bootstrap=boot_ref, settings=settings)

        async with trio.open_nursery() as nursery:
            proxy = ProxyService(
                boot, boot.identity, directory(boot), models=(MODEL,), verifier=verifier, settings=settings
            )
            await nursery.start(proxy.run)
            for ov in (honest_ov, impostor_ov):
                addrs = tuple(a.rsplit("/p2p/", 1)[0] for a in ov.listen_addrs())
                profile = WorkerProfile(
                    ov.peer_id, ov.identity.public_key, addrs, MODEL, model_hash, capacity=2,
                    max_context=2048, decode_tok_s=30.0, tier="tdx",
                )  # fmt: skip
                # The impostor serves the honest worker's report as its own.
                worker = WorkerService(
                    ov, ov.identity, profile, PricingPolicy(10, 40), directory(ov), report=report,
                    settings=settings,
                )  # fmt: skip
                await nursery.start(worker.run)
            with trio.fail_after(30):
                await proxy.wait_until(_verdicts_on(proxy, {honest_ov.peer_id, impostor_ov.peer_id}))
            client = MarketClient(client_ov, directory(client_ov), settings=settings)
            match = await client.match(
                MODEL, max_price_prompt=1000, max_price_completion=1000, min_tier="tdx", count=4
            )
            assert [r.body.peer_id for r in match.offers] == [honest_ov.peer_id]
            verdicts = [(v.body.worker_peer_id, v.body.status) for v in match.verdicts]
            assert verdicts == [(honest_ov.peer_id, "ok")]
            rejected = proxy.core.book.verdict(impostor_ov.peer_id, hashlib.sha256(report).digest())
            assert rejected is not None
            assert (rejected.body.status, rejected.body.reason) == ("rejected", "wrong_peer")
            nursery.cancel_scope.cancel()


def _verdicts_on(proxy: ProxyService, workers: set[str]) -> Callable[[], bool]:
    """The proxy holds a verdict (ok or not) on the report of each worker's current offer."""

    def done() -> bool:
        book = proxy.core.book
        offers = [book.get(w) for w in workers]
        return all(r is not None and book.verdict(r.body.peer_id, r.body.attestation_hash) for r in offers)

    return done
