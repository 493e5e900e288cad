"""The Directory around slow DHTs, repeated announcements and epoch handovers.

Same in-memory fake overlay and virtual time as ``test_market_service.py``
(whose fixtures these tests reuse); the real overlay runs in
``tests/integration/test_market_overlay.py``.
"""

from __future__ import annotations

from collections import Counter

import trio
import trio.testing

from market.directory import Candidate, Directory, ProxyRef
from market.protocols import CANDIDACY_TOPIC
from market.records import SignedCandidacy
from market.testing import make_candidacy, seeded_identity, ton_address
from market.validation import StakeTable
from overlay import wire
from overlay.gossip import Validation
from tests.unit.test_market_service import (
    CLOCK,
    SETTINGS,
    FakeDht,
    FakeNet,
    FakeOverlay,
    _run_node,
    candidate,
    view,
    wall,
)

T_MID = CLOCK.start(5) + CLOCK.length / 2  # the middle of an epoch with two before it


class StalledDht(FakeDht):
    """A DHT whose writes never finish (an overloaded or partitioned Kademlia)."""

    async def put(self, key: str, value: bytes) -> None:
        await trio.sleep_forever()

    async def provide(self, key: str) -> bool:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_stalled_dht_never_holds_up_announcements(autojump_clock: trio.testing.MockClock) -> None:
    """Candidacies go out on gossip every round although no DHT write ever returns: no epoch lacks a set."""
    net = FakeNet()
    stakes = StakeTable()
    idents = [seeded_identity(i, "dir-cand") for i in range(3)] + [seeded_identity(0, "dir-obs")]
    async with trio.open_nursery() as n:
        dirs = []
        for i, ident in enumerate(idents):
            ov = await n.start(_run_node, net, ident)
            ov.dht = StalledDht(ov)
            d = Directory(
                ov, ident, view(stakes), dht=ov.dht, settings=SETTINGS, clock=wall,
                candidate=candidate(i, stakes) if i < 3 else None,
            )  # fmt: skip
            dirs.append(d)
            await n.start(d.run)
        first = CLOCK.epoch_of(wall()) + 2  # the first epoch whose cut-off is still ahead
        for epoch in range(first, first + 5):
            await trio.sleep(CLOCK.start(epoch) + 1 - wall())
            sets = {tuple(p.peer_id for p in d.elected()) for d in dirs}
            assert len(sets) == 1, (epoch, sets)
            (elected,) = sets
            assert len(elected) == 2, epoch
        assert all(d.stored == 0 for d in dirs)  # every write is still hanging
        assert all(d.announced >= 5 * CLOCK.length / SETTINGS.announce_every for d in dirs[:3])
        n.cancel_scope.cancel()


async def test_re_announcements_repeat_the_record_and_peers_do_not_relay_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same signed record goes out each round (peers IGNORE it); a changed claim is signed afresh."""
    net = FakeNet()
    stakes = StakeTable()
    cand_id, stake = seeded_identity(1, "re-cand"), seeded_identity(1, "re-stake")
    obs_a, obs_b = seeded_identity(1, "re-obs"), seeded_identity(2, "re-obs")
    address = ton_address(stake.public_key)
    stakes.set_key(address, stake.public_key)
    claim = {"amount": 1000}
    for epoch in range(CLOCK.epoch_of(wall()) - 1, CLOCK.epoch_of(wall()) + 10):
        stakes.set_stake(address, epoch, 1000)
    async with trio.open_nursery() as n:
        cand_ov = await n.start(_run_node, net, cand_id)
        for ident in (obs_a, obs_b):
            ov = await n.start(_run_node, net, ident)
            await n.start(Directory(ov, ident, view(stakes), settings=SETTINGS, clock=wall).run)
        d = Directory(
            cand_ov, cand_id, view(stakes), settings=SETTINGS, clock=wall,
            candidate=Candidate(stake, address, "op", lambda epoch: claim["amount"]),
        )  # fmt: skip
        await n.start(d.run)
        await trio.sleep(5 * SETTINGS.announce_every)
        claim["amount"] = 900
        await trio.sleep(3 * SETTINGS.announce_every)
        n.cancel_scope.cancel()

    sent = [
        wire.decode_as(SignedCandidacy, data) for topic, data in cand_ov.published if topic == CANDIDACY_TOPIC
    ]
    distinct = set(sent)
    assert len(sent) >= 2 * len(distinct)  # records are repeated, not re-signed every round
    assert {r.body.stake_amount for r in distinct} == {1000, 900}  # ... until the claim changes
    decisions = Counter((peer, d) for topic, peer, d in net.gossip_log if topic == CANDIDACY_TOPIC)
    for peer in (obs_a.peer_id, obs_b.peer_id):
        assert decisions[(peer, Validation.ACCEPT)] == len(distinct)
        assert decisions[(peer, Validation.IGNORE)] == len(sent) - len(distinct)
        assert decisions[(peer, Validation.REJECT)] == 0


def test_handover_keeps_the_outgoing_and_incoming_proxies() -> None:
    """Around a boundary a node keeps the proxies it used just before it and those it uses just after."""
    net = FakeNet()
    stakes = StakeTable()
    node = seeded_identity(9, "handover-node")
    d = Directory(FakeOverlay(net, node), node, view(stakes), settings=SETTINGS, clock=wall)
    e = CLOCK.epoch_of(T_MID)
    for epoch in (e - 1, e, e + 1):
        for i in range(6):
            cand, stake = seeded_identity(i, "handover"), seeded_identity(i, "handover-stake")
            issued = CLOCK.cutoff(epoch) - 10
            rec = make_candidacy(cand, stake, epoch=epoch, now=issued, amount=1000 + i, stakes=stakes)
            assert d.view.receive_candidacy(rec, issued + 1).accepted
    r = 3

    before = ids(d.proxies_for(node.peer_id, r, now=CLOCK.start(e) - 1))
    during = ids(d.proxies_for(node.peer_id, r, now=CLOCK.start(e) + 1))
    after = ids(d.proxies_for(node.peer_id, r, now=CLOCK.start(e + 1) + 1))
    assert before != during or during != after  # the sets rotate, so the handover matters here
    # Mid-epoch: exactly the current proxies.
    assert ids(d.handover_proxies(node.peer_id, r, now=T_MID)) == during
    # Just after the boundary, within the overlap: the outgoing ones too.
    assert ids(d.handover_proxies(node.peer_id, r, now=CLOCK.start(e) + 1)) == during | before
    # In the last overlap seconds: the incoming ones already.
    late = CLOCK.start(e + 1) - CLOCK.overlap / 2
    assert ids(d.handover_proxies(node.peer_id, r, now=late)) == during | after
    # The current proxies come first, best first.
    current = d.proxies_for(node.peer_id, r, now=late)
    assert d.handover_proxies(node.peer_id, r, now=late)[: len(current)] == current


def ids(refs: list[ProxyRef]) -> set[str]:
    return {p.peer_id for p in refs}
