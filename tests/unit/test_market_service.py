"""The market shells over an in-memory FAKE overlay, in virtual time (trio's autojump clock).

The fake stands in for :class:`overlay.host.Overlay` only so that minutes of
republishing and epochs of elections run in milliseconds: streams are real
:class:`~overlay.streams.FramedStream`s over in-memory byte streams, gossip is a
flood in which every subscriber runs its (real) validator, and the DHT is a
dict that runs the (real) namespace validators.  The real overlay is exercised
in ``tests/integration/test_market_overlay.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from market.client import MarketClient, NoMatch
from market.core import ElectionView, ProxyCore
from market.directory import Candidate, Directory, ProxyRef
from market.election import ElectionParams, EpochClock
from market.pricing import PricingPolicy, WorkerProfile
from market.protocols import CANDIDACY_TOPIC, MarketSettings, StreamHandler, offer_topic
from market.records import SignedOffer, UsageReport, sign_offer
from market.service import ProxyService, WorkerLoadSample, WorkerService
from market.testing import MODEL_HASH, fixed_epoch_seed, offer_body, seeded_identity, ton_address
from market.validation import StakeTable
from market.verify import AttestationVerdict
from overlay import wire
from overlay.errors import DialError, NodeError
from overlay.gossip import Validation
from overlay.identity import Identity
from overlay.streams import FramedStream, memory_stream_pair

T0 = 1_700_000_000.0
Validator = Callable[[str, bytes], Validation]


def wall() -> float:
    return T0 + trio.current_time()


@attrs.frozen
class _Msg:
    data: bytes


@attrs.frozen
class _Provider:
    peer_id: str
    addrs: tuple[str, ...] = ()


class FakeNet:
    def __init__(self) -> None:
        self.nodes: dict[str, FakeOverlay] = {}
        self.store: dict[str, bytes] = {}
        self.providers: dict[str, set[str]] = {}
        self.gossip_log: list[tuple[str, str, Validation]] = []  # (topic, receiver, decision)

    @asynccontextmanager
    async def node(self, identity: Identity) -> AsyncIterator[FakeOverlay]:
        ov = FakeOverlay(self, identity)
        async with trio.open_nursery() as nursery:
            ov.nursery = nursery
            self.nodes[ov.peer_id] = ov
            try:
                yield ov
            finally:
                del self.nodes[ov.peer_id]
                nursery.cancel_scope.cancel()


class FakeDht:
    def __init__(self, ov: FakeOverlay) -> None:
        self.ov = ov
        self.checks: dict[str, Callable[[str, bytes], bool]] = {}

    def register_namespace(
        self, namespace: str, check: Callable[[str, bytes], bool], select: object = None
    ) -> None:
        self.checks[namespace] = check

    async def put(self, key: str, value: bytes) -> None:
        check = self.checks.get(key.split("/")[1])
        if check is None or not check(key, value):
            raise NodeError(f"record {key} rejected")
        self.ov.net.store[key] = value

    async def get(self, key: str) -> bytes | None:
        value = self.ov.net.store.get(key)
        check = self.checks.get(key.split("/")[1])
        return value if value is not None and check is not None and check(key, value) else None

    async def provide(self, key: str) -> bool:
        self.ov.net.providers.setdefault(key, set()).add(self.ov.peer_id)
        return True

    async def find_providers(self, key: str, count: int = 20) -> list[_Provider]:
        return [_Provider(p) for p in sorted(self.ov.net.providers.get(key, set()))][:count]


class FakeOverlay:
    def __init__(self, net: FakeNet, identity: Identity) -> None:
        self.net = net
        self.identity = identity
        self.peer_id = identity.peer_id
        self.handlers: dict[str, StreamHandler] = {}
        self.subs: dict[
            str, tuple[Callable[[str, bytes], Validation] | None, trio.MemorySendChannel[_Msg]]
        ] = {}
        self.nursery: trio.Nursery | None = None
        self.dht = FakeDht(self)
        self.published: list[tuple[str, bytes]] = []

    def listen_addrs(self) -> list[str]:
        return [f"/ip4/10.0.0.1/tcp/4001/p2p/{self.peer_id}"]

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[protocol] = handler

    async def open_stream(self, peer_id: str, protocol: str, *, addrs: tuple[str, ...] = ()) -> FramedStream:
        await trio.sleep(0.01)  # a little latency
        target = self.net.nodes.get(peer_id)
        if target is None or target.nursery is None:
            raise DialError(f"cannot reach {peer_id}")
        handler = target.handlers.get(protocol)
        if handler is None:
            raise DialError(f"{peer_id} does not speak {protocol}")
        a, b = memory_stream_pair()
        server = FramedStream(b, peer_id=self.peer_id)

        async def serve() -> None:
            try:
                await handler(server)
            except NodeError:
                await server.reset()
            else:
                await server.aclose()

        target.nursery.start_soon(serve)
        return FramedStream(a, peer_id=peer_id)

    async def subscribe(
        self, topic: str, validator: Callable[[str, bytes], Validation] | None = None
    ) -> trio.MemoryReceiveChannel[_Msg]:
        send, recv = trio.open_memory_channel[_Msg](10_000)
        self.subs[topic] = (validator, send)
        return recv

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append((topic, data))
        mine = self.subs.get(topic)
        if mine is not None and mine[0] is not None and mine[0](self.peer_id, data) is not Validation.ACCEPT:
            return  # py-libp2p runs our own validator on our publishes too
        await trio.sleep(0.02)
        for peer, node in list(self.net.nodes.items()):
            sub = node.subs.get(topic)
            if peer == self.peer_id or sub is None:
                continue
            validator, send = sub
            decision = Validation.ACCEPT if validator is None else validator(self.peer_id, data)
            self.net.gossip_log.append((topic, peer, decision))
            if decision is Validation.ACCEPT:
                send.send_nowait(_Msg(data))


# ----------------------------------------------------------------------------- fixtures

CLOCK = EpochClock(genesis=T0, length=300.0, lead=300.0, overlap=30.0)
SETTINGS = MarketSettings(
    refresh=120, lifetime=600, tick=2.0, heartbeat=1.0, stats_every=30, announce_every=60
)
MODEL = "tiny"


def view(stakes: StakeTable) -> ElectionView:
    return ElectionView(CLOCK, fixed_epoch_seed, stakes, params=ElectionParams(k=2))


def profile(ident: Identity, **change: object) -> WorkerProfile:
    p = WorkerProfile(
        ident.peer_id, ident.public_key, ("/ip4/10.0.0.2/tcp/4001",), MODEL, MODEL_HASH, 4, 2048, 50.0
    )
    return attrs.evolve(p, **change)


def candidate(i: int, stakes: StakeTable) -> Candidate:
    stake = seeded_identity(i, "svc-stake")
    address = ton_address(stake.public_key)
    stakes.set_key(address, stake.public_key)
    for epoch in range(0, 20):
        stakes.set_stake(address, epoch, 1000 + i)
    return Candidate(stake, address, f"operator-{i}", lambda epoch: 1000 + i)


class StubVerifier:
    """A stand-in for node.tee.Verifier (no TEE here): accepts exactly the reports it was told about."""

    def __init__(self, good: dict[bytes, AttestationVerdict]) -> None:
        self.good = good
        self.calls = 0

    def verify(self, report: bytes, *, now: float, peer_id: str | None = None) -> AttestationVerdict:
        self.calls += 1
        v = self.good.get(report)
        if v is None or (peer_id is not None and v.peer_id != peer_id):
            return AttestationVerdict(
                hashlib.sha256(report).digest(), False, "bad_format", "unknown report", "none", "", "",
                b"", b"", -1, now, now + 60,
            )  # fmt: skip
        return attrs.evolve(v, verified_at=now, expires_at=now + 3600)


# ----------------------------------------------------------------------------- tests


async def test_offers_flow_to_the_proxy_and_a_client_gets_a_checked_match(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet()
    stakes = StakeTable()
    p_id, w_id, c_id = seeded_identity(1, "svc"), seeded_identity(2, "svc"), seeded_identity(3, "svc")
    boot = (ProxyRef(p_id.peer_id),)
    load = WorkerLoadSample()

    async with net.node(p_id) as pov, net.node(w_id) as wov, net.node(c_id) as cov, trio.open_nursery() as n:
        pdir = Directory(pov, p_id, view(stakes), bootstrap=boot, settings=SETTINGS, clock=wall)
        proxy = ProxyService(pov, p_id, pdir, models=(MODEL,), settings=SETTINGS, clock=wall)
        wdir = Directory(wov, w_id, view(stakes), bootstrap=boot, settings=SETTINGS, clock=wall)
        worker = WorkerService(
            wov,
            w_id,
            profile(w_id),
            PricingPolicy(100, 400),
            wdir,
            load=lambda: load,
            settings=SETTINGS,
            clock=wall,
        )
        cdir = Directory(cov, c_id, view(stakes), bootstrap=boot, settings=SETTINGS, clock=wall)
        client = MarketClient(cov, cdir, settings=SETTINGS, clock=wall)
        for svc in (pdir, proxy, wdir, cdir):
            await n.start(svc.run)
        await n.start(worker.run)
        with trio.fail_after(30):
            await proxy.wait_until(lambda: w_id.peer_id in proxy.core.book)
        match = await client.match(MODEL, max_price_prompt=1000, max_price_completion=1000)
        assert match.proxy == p_id.peer_id
        assert [r.body.peer_id for r in match.offers] == [w_id.peer_id]
        # Heartbeats arrive over direct streams.
        with trio.fail_after(30):
            await proxy.wait_until(lambda: proxy.core.book.load_of(w_id.peer_id) is not None)
        assert worker.heartbeats_acked > 0
        # Routine re-publishing keeps the offer alive past its lifetime.
        await trio.sleep(700)
        assert worker.published >= 5
        assert w_id.peer_id in proxy.core.book
        # A busier worker raises its price and re-publishes at once.
        before = proxy.core.book.get(w_id.peer_id)
        assert before is not None
        load = WorkerLoadSample(active=3, queue_tokens=8000)
        worker.nudge()

        def repriced() -> bool:
            cur = proxy.core.book.get(w_id.peer_id)
            return cur is not None and cur.body.seqno != before.body.seqno

        with trio.fail_after(30):
            await proxy.wait_until(repriced)
        cur = proxy.core.book.get(w_id.peer_id)
        assert cur is not None
        assert cur.body.price_completion > before.body.price_completion
        # Statistics by request; a price cap below the market gets a hint.
        stats = await client.stats(MODEL)
        assert stats.body.live_offers == 1
        with pytest.raises(NoMatch) as info:
            await client.match(MODEL, max_price_prompt=1000, max_price_completion=10)
        assert info.value.price_hint == cur.body.price_completion
        # A withdrawal removes the worker at once.
        await worker.withdraw()
        await trio.sleep(1)
        assert w_id.peer_id not in proxy.core.book
        n.cancel_scope.cancel()


async def test_bad_gossip_never_reaches_the_book(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    p_id, w_id, evil = seeded_identity(1, "svc"), seeded_identity(2, "svc"), seeded_identity(9, "svc")
    async with net.node(p_id) as pov, net.node(evil) as eov, trio.open_nursery() as n:
        pdir = Directory(pov, p_id, view(StakeTable()), bootstrap=(ProxyRef(p_id.peer_id),), clock=wall)
        proxy = ProxyService(pov, p_id, pdir, models=(MODEL,), settings=SETTINGS, clock=wall)
        await n.start(pdir.run)
        await n.start(proxy.run)
        topic = offer_topic(MODEL)
        now = wall()
        body = offer_body(w_id, now=now)
        bad = [
            b"\x93garbage",
            wire.encode(SignedOffer(body=body, signature=evil.sign(wire.encode(body)))),  # forged
            wire.encode(sign_offer(evil, attrs.evolve(offer_body(evil, now=now), peer_id=w_id.peer_id))),
            wire.encode(sign_offer(w_id, attrs.evolve(body, price_completion=10**13))),  # absurd
            wire.encode(sign_offer(w_id, attrs.evolve(body, issued_at=now + 3600, expires_at=now + 3700))),
        ]
        for data in bad:
            await eov.publish(topic, data)
        await trio.sleep(1)
        assert len(proxy.core.book) == 0
        decisions = [d for t, peer, d in net.gossip_log if peer == p_id.peer_id]
        assert decisions == [Validation.REJECT] * 4 + [Validation.IGNORE]
        # A flood: only one of ten offers within ten seconds gets in.
        for i in range(10):
            await eov.publish(topic, wire.encode(sign_offer(evil, offer_body(evil, now=wall(), seqno=i + 1))))
            await trio.sleep(0.5)
        assert len(proxy.core.book) == 1
        n.cancel_scope.cancel()


async def test_candidates_are_elected_and_everyone_agrees(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    stakes = StakeTable()
    cands = [seeded_identity(i, "cand") for i in range(3)]
    others = [seeded_identity(i, "plain") for i in range(4)]
    async with trio.open_nursery() as n:
        dirs: list[Directory] = []
        ovs = []
        for i, ident in enumerate(cands + others):
            ov = await n.start(_run_node, net, ident)
            ovs.append(ov)
            d = Directory(
                ov, ident, view(stakes), dht=ov.dht, settings=SETTINGS, clock=wall,
                candidate=candidate(i, stakes) if i < 3 else None,
            )  # fmt: skip
            dirs.append(d)
            await n.start(d.run)
        now = wall()
        current = CLOCK.epoch_of(now)
        assert all(d.elected() == [] for d in dirs)  # nothing elected yet: the bootstrap list rules
        await trio.sleep(CLOCK.start(current + 2) - now + 1)
        sets = {tuple(p.peer_id for p in d.elected()) for d in dirs}
        assert len(sets) == 1
        (elected,) = sets
        assert len(elected) == 2  # k = 2 of 3 candidates
        assert set(elected) <= {c.peer_id for c in cands}
        for d in dirs:
            assert {p.peer_id for p in d.proxies_for("some-node", r=3)} == set(elected)
            assert all(d.is_active_proxy(p) for p in elected)
        # A node that joins late gets the candidacies from the DHT.
        late = seeded_identity(0, "late")
        ov = await n.start(_run_node, net, late)
        d = Directory(ov, late, view(stakes), dht=ov.dht, settings=SETTINGS, clock=wall)
        await n.start(d.run)
        with trio.fail_after(10):
            await d.wait_until(lambda: bool(d.elected()))
        assert tuple(p.peer_id for p in d.elected()) == elected
        # Forged candidacies on the topic change nothing.
        evil_ov = ovs[-1]
        await evil_ov.publish(CANDIDACY_TOPIC, b"junk")
        assert tuple(p.peer_id for p in dirs[0].elected()) == elected
        n.cancel_scope.cancel()


async def _run_node(net: FakeNet, ident: Identity, *, task_status: trio.TaskStatus[FakeOverlay]) -> None:
    async with net.node(ident) as ov:
        task_status.started(ov)
        await trio.sleep_forever()


async def test_attested_offers_are_verified_endorsed_and_matched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet()
    p_id, w_id, c_id = seeded_identity(1, "att"), seeded_identity(2, "att"), seeded_identity(3, "att")
    report = b"a TDX quote and claims, as node.tee would produce them"
    rh = hashlib.sha256(report).digest()
    good = AttestationVerdict(
        rh, True, "", "", "tdx", w_id.peer_id, "UpToDate", b"m" * 48, MODEL_HASH, 1, 0, 0
    )
    verifier = StubVerifier({report: good})
    boot = (ProxyRef(p_id.peer_id),)
    async with trio.open_nursery() as n:
        pov = await n.start(_run_node, net, p_id)
        wov = await n.start(_run_node, net, w_id)
        cov = await n.start(_run_node, net, c_id)
        pdir = Directory(pov, p_id, view(StakeTable()), bootstrap=boot, clock=wall)
        proxy = ProxyService(
            pov, p_id, pdir, models=(MODEL,), verifier=verifier, settings=SETTINGS, clock=wall
        )
        wdir = Directory(wov, w_id, view(StakeTable()), bootstrap=boot, clock=wall)
        worker = WorkerService(
            wov, w_id, profile(w_id, tier="tdx"), PricingPolicy(100, 400), wdir, report=report,
            settings=SETTINGS, clock=wall,
        )  # fmt: skip
        cdir = Directory(cov, c_id, view(StakeTable()), bootstrap=boot, clock=wall)
        client = MarketClient(cov, cdir, settings=SETTINGS, clock=wall)
        for svc in (pdir, wdir, cdir, proxy, worker):
            await n.start(svc.run)
        with trio.fail_after(30):
            while True:
                try:
                    match = await client.match(
                        MODEL, max_price_prompt=1000, max_price_completion=1000, min_tier="tdx"
                    )
                    break
                except NoMatch:
                    await trio.sleep(1)
        assert [r.body.peer_id for r in match.offers] == [w_id.peer_id]
        assert [v.body.status for v in match.verdicts] == ["ok"]
        assert verifier.calls == 1
        assert any(topic == "/cocoon/verdicts/1" for topic, _ in pov.published)
        n.cancel_scope.cancel()


async def test_without_a_verifier_attested_offers_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    p_id, w_id = seeded_identity(1, "nov"), seeded_identity(2, "nov")
    boot = (ProxyRef(p_id.peer_id),)
    async with trio.open_nursery() as n:
        pov = await n.start(_run_node, net, p_id)
        wov = await n.start(_run_node, net, w_id)
        proxy = ProxyService(
            pov, p_id, Directory(pov, p_id, view(StakeTable()), bootstrap=boot), models=(MODEL,)
        )
        assert proxy.core.attested_tiers is False
        wdir = Directory(wov, w_id, view(StakeTable()), bootstrap=boot, clock=wall)
        worker = WorkerService(
            wov,
            w_id,
            profile(w_id, tier="tdx"),
            PricingPolicy(1, 1),
            wdir,
            report=b"r",
            settings=SETTINGS,
            clock=wall,
        )
        await n.start(proxy.run)
        await n.start(worker.run)
        await trio.sleep(5)
        assert len(proxy.core.book) == 0
        assert (offer_topic(MODEL), p_id.peer_id, Validation.IGNORE) in net.gossip_log
        n.cancel_scope.cancel()


async def test_client_fails_over_and_reports_usage(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    dead, p_id, c_id = seeded_identity(0, "fo"), seeded_identity(1, "fo"), seeded_identity(2, "fo")
    w = seeded_identity(3, "fo")
    boot = (ProxyRef(dead.peer_id), ProxyRef(p_id.peer_id))
    async with trio.open_nursery() as n:
        pov = await n.start(_run_node, net, p_id)
        cov = await n.start(_run_node, net, c_id)
        core = ProxyCore(attested_tiers=False)
        core.book.exploration = 0.0
        pdir = Directory(pov, p_id, view(StakeTable()), bootstrap=boot, clock=wall)
        proxy = ProxyService(pov, p_id, pdir, core=core, clock=wall)
        await n.start(proxy.run)
        rec = sign_offer(w, offer_body(w, now=wall()))
        assert core.receive_offer(rec, wall()).accepted
        client = MarketClient(
            cov, Directory(cov, c_id, view(StakeTable()), bootstrap=boot, clock=wall), clock=wall
        )
        match = await client.match("tiny", max_price_prompt=1000, max_price_completion=1000)
        assert match.proxy == p_id.peer_id  # the dead one was skipped
        await client.report(p_id.peer_id, UsageReport(w.peer_id, False, 0, 0))
        await trio.sleep(1)
        assert core.book.suspended(w.peer_id, wall())
        with pytest.raises(NoMatch):
            await client.match("tiny", max_price_prompt=1000, max_price_completion=1000)
        n.cancel_scope.cancel()


async def test_client_refuses_what_a_lying_proxy_returns(autojump_clock: trio.testing.MockClock) -> None:
    """A proxy that tampers with offers or hands out other models gets nothing past the client."""
    net = FakeNet()
    p_id, c_id, w = seeded_identity(1, "liar"), seeded_identity(2, "liar"), seeded_identity(3, "liar")
    from market.records import MatchRequest, MatchResponse

    async def lying(stream: FramedStream) -> None:
        req = await stream.receive()
        assert isinstance(req, MatchRequest)
        good = sign_offer(w, offer_body(w, now=wall(), price_completion=50))
        tampered = attrs.evolve(good, body=attrs.evolve(good.body, price_completion=1))
        other_model = sign_offer(w, offer_body(w, now=wall(), model_id="other"))
        expensive = sign_offer(w, offer_body(w, now=wall(), price_completion=10**6))
        await stream.send(MatchResponse(req.request_id, (tampered, other_model, expensive), (), None, ""))

    async with trio.open_nursery() as n:
        pov = await n.start(_run_node, net, p_id)
        cov = await n.start(_run_node, net, c_id)
        pov.set_stream_handler("/cocoon/market/match/1", lying)
        boot = (ProxyRef(p_id.peer_id),)
        client = MarketClient(
            cov, Directory(cov, c_id, view(StakeTable()), bootstrap=boot, clock=wall), clock=wall
        )
        with pytest.raises(NoMatch):
            await client.match("tiny", max_price_prompt=1000, max_price_completion=1000)
        n.cancel_scope.cancel()


def test_fake_overlay_matches_the_protocol() -> None:
    from market.protocols import MarketOverlay

    def takes(ov: MarketOverlay) -> str:
        return ov.peer_id

    assert takes(FakeOverlay(FakeNet(), seeded_identity(0, "p"))) == seeded_identity(0, "p").peer_id
