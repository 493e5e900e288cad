"""Proxy election and attachment: determinism, operator limits, caps, minimal disruption, bad input."""

from __future__ import annotations

import random
import statistics

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from market.core import ElectionView
from market.election import (
    CandidacyPool,
    ElectedProxy,
    ElectionParams,
    EpochClock,
    attach,
    elect,
)
from market.records import SignedCandidacy
from market.testing import fixed_epoch_seed, make_candidacy, seeded_identity
from market.validation import Decision, StakeTable
from overlay import wire

EPOCH = 7
CLOCK = EpochClock(genesis=0.0, length=100.0, lead=100.0, overlap=20.0)
ISSUED = CLOCK.cutoff(EPOCH) - 50.0  # well before the cut-off


def candidacies(
    n: int, *, stakes: StakeTable | None = None, operators: int | None = None
) -> list[SignedCandidacy]:
    out = []
    for i in range(n):
        op = f"op-{i % operators}" if operators else None
        out.append(
            make_candidacy(
                seeded_identity(i, "cand"),
                seeded_identity(i, "stake"),
                epoch=EPOCH,
                now=ISSUED,
                amount=1000 + 37 * i,
                operator=op,
                stakes=stakes,
            )
        )
    return out


POOL = candidacies(60, operators=20)


def test_elects_k_with_at_most_two_per_operator() -> None:
    chosen = elect(POOL, EPOCH, fixed_epoch_seed(EPOCH), ElectionParams(k=32, max_per_operator=2))
    assert len(chosen) == 32
    ops = [p.operator for p in chosen]
    assert max(ops.count(o) for o in ops) <= 2
    assert len({p.peer_id for p in chosen}) == 32
    # Another seed, another set.
    other = elect(POOL, EPOCH, fixed_epoch_seed(EPOCH + 1), ElectionParams(k=32))
    assert {p.peer_id for p in other} != {p.peer_id for p in chosen}


def test_operator_limit_can_leave_seats_empty() -> None:
    pool = candidacies(10, operators=2)
    assert len(elect(pool, EPOCH, b"s", ElectionParams(k=8, max_per_operator=2))) == 4


def test_weights_are_capped_at_twice_the_median() -> None:
    pool = candidacies(9)
    whale = make_candidacy(
        seeded_identity(99, "cand"), seeded_identity(99, "stake"), epoch=EPOCH, now=ISSUED, amount=10**15
    )
    chosen = elect([*pool, whale], EPOCH, b"seed", ElectionParams(k=10))
    weights = {p.peer_id: p.weight for p in chosen}
    stakes = sorted(c.body.stake_amount for c in [*pool, whale])
    assert weights[whale.body.peer_id] == 2 * statistics.median(stakes)


def test_whale_does_not_take_every_seat_over_many_seeds() -> None:
    pool = candidacies(40)
    whale = make_candidacy(
        seeded_identity(99, "cand"), seeded_identity(99, "stake"), epoch=EPOCH, now=ISSUED, amount=10**15
    )
    wins = sum(
        whale.body.peer_id
        in {p.peer_id for p in elect([*pool, whale], EPOCH, bytes([s]), ElectionParams(k=4))}
        for s in range(100)
    )
    assert wins < 60  # capped: about 2x an average candidate's chance (~20%), not 100%


def test_one_stake_address_backs_one_candidate() -> None:
    stake = seeded_identity(0, "stake")
    twins = [
        make_candidacy(seeded_identity(i, "twin"), stake, epoch=EPOCH, now=ISSUED, amount=5000)
        for i in range(5)
    ]
    chosen = elect(twins, EPOCH, b"seed", ElectionParams(k=5))
    assert [p.peer_id for p in chosen] == [min(c.body.peer_id for c in twins)]


@settings(max_examples=50, deadline=None)
@given(st.permutations(POOL), st.lists(st.integers(0, 59), max_size=20))
def test_same_candidacies_in_any_order_elect_the_same_set(
    order: list[SignedCandidacy], dups: list[int]
) -> None:
    reference = elect(POOL, EPOCH, fixed_epoch_seed(EPOCH), ElectionParams(k=16))
    shuffled = order + [POOL[i] for i in dups]
    assert elect(shuffled, EPOCH, fixed_epoch_seed(EPOCH), ElectionParams(k=16)) == reference
    # The same through a pool fed in this order.
    pool = CandidacyPool(CLOCK)
    for c in shuffled:
        pool.add(c)
    assert elect(pool.candidacies(EPOCH), EPOCH, fixed_epoch_seed(EPOCH), ElectionParams(k=16)) == reference


def test_pool_keeps_the_latest_candidacy_and_drops_late_ones() -> None:
    pool = CandidacyPool(CLOCK)
    ident, stake = seeded_identity(0, "cand"), seeded_identity(0, "stake")
    early = make_candidacy(ident, stake, epoch=EPOCH, now=ISSUED)
    later = make_candidacy(ident, stake, epoch=EPOCH, now=ISSUED + 10)
    late = make_candidacy(ident, stake, epoch=EPOCH, now=CLOCK.cutoff(EPOCH) + 1)
    assert pool.add(later)
    assert not pool.add(early)
    assert not pool.add(late)
    assert pool.candidacies(EPOCH) == [later]
    pool.prune(EPOCH + 1)
    assert pool.epochs() == []


def test_epoch_clock_and_overlap() -> None:
    assert CLOCK.epoch_of(705.0) == 7
    assert CLOCK.start(7) == 700.0
    assert CLOCK.cutoff(7) == 600.0
    assert CLOCK.active_epochs(705.0) == (7, 6)
    assert CLOCK.active_epochs(725.0) == (7,)


def proxies(n: int, weight: float = 1.0) -> list[ElectedProxy]:
    return [ElectedProxy(f"proxy-{i:03d}", bytes(32), (), f"op{i}", weight) for i in range(n)]


NODES = [f"node-{i}" for i in range(2000)]


def test_removing_a_proxy_moves_only_its_nodes() -> None:
    k = 32
    ps = proxies(k)
    before = {n: attach(n, ps, EPOCH, r=3) for n in NODES}
    gone = ps[5].peer_id
    after = {n: attach(n, [p for p in ps if p.peer_id != gone], EPOCH, r=3) for n in NODES}
    moved = [n for n in NODES if before[n][0] != after[n][0]]
    assert all(before[n][0] == gone for n in moved)
    assert len(moved) == sum(before[n][0] == gone for n in NODES)
    assert len(moved) / len(NODES) < 2.0 / k  # about 1/k
    # Top-3 sets lose at most the removed proxy and gain one replacement.
    for n in NODES:
        assert len(set(before[n]) - set(after[n])) <= 1


@settings(max_examples=25, deadline=None)
@given(k=st.integers(8, 40), victim=st.integers(0, 39), seed=st.integers(0, 1000))
def test_replacing_one_proxy_moves_about_one_kth_of_nodes(k: int, victim: int, seed: int) -> None:
    rng = random.Random(seed)
    ps = [ElectedProxy(f"p{seed}-{i}", bytes(32), (), f"o{i}", rng.uniform(1, 3)) for i in range(k)]
    victim %= k
    new = ElectedProxy(f"p{seed}-new", bytes(32), (), "onew", ps[victim].weight)
    replaced = [*ps[:victim], new, *ps[victim + 1 :]]
    nodes = NODES[:600]
    before = {n: attach(n, ps, EPOCH, r=3) for n in nodes}
    after = {n: attach(n, replaced, EPOCH, r=3) for n in nodes}
    moved = [n for n in nodes if before[n][0] != after[n][0]]
    # Exactly: a node moves only off the replaced proxy or onto the new one.
    assert all(before[n][0] == ps[victim].peer_id or after[n][0] == new.peer_id for n in moved)
    # Each side is about one k-th (weights vary, so allow the victim's weight share and sampling noise).
    share = ps[victim].weight / sum(p.weight for p in ps)
    assert len(moved) / len(nodes) <= 2 * share + 0.06
    for n in nodes:
        assert len(set(before[n]) ^ set(after[n])) <= 2


def test_attachment_spreads_nodes_by_weight() -> None:
    ps = [*proxies(4, 1.0), ElectedProxy("heavy", bytes(32), (), "oh", 2.0)]
    counts: dict[str, int] = {}
    for n in NODES:
        top = attach(n, ps, EPOCH, r=1)[0]
        counts[top] = counts.get(top, 0) + 1
    assert abs(counts["heavy"] / len(NODES) - 2 / 6) < 0.04


# ----------------------------------------------------------------------------- bad input


def view(stakes: StakeTable) -> ElectionView:
    return ElectionView(CLOCK, fixed_epoch_seed, stakes, params=ElectionParams(k=8))


def test_bad_candidacies_never_change_the_election() -> None:
    stakes = StakeTable()
    good = candidacies(12, stakes=stakes)
    v = view(stakes)
    now = ISSUED + 1
    for c in good:
        assert v.receive_candidacy(c, now, "peer").accepted
    reference = v.proxies(EPOCH)
    evil, evil_stake = seeded_identity(0, "evil"), seeded_identity(1, "evil")
    bad: list[SignedCandidacy] = []
    # Unprovable stake: the stake key is not registered for the address.
    bad.append(make_candidacy(evil, evil_stake, epoch=EPOCH, now=ISSUED, amount=10**9))
    # Forged: signed by evil for someone else's peer id.
    target = good[0].body
    forged_body = attrs.evolve(target, stake_amount=10**9)
    bad.append(attrs.evolve(good[0], body=forged_body))
    # Claims someone else's stake with its own candidate key (stake signature cannot be produced).
    body = attrs.evolve(good[1].body, candidate_key=evil.public_key, peer_id=evil.peer_id)
    data = wire.encode(body)
    bad.append(SignedCandidacy(body=body, signature=evil.sign(data), stake_signature=evil.sign(data)))
    # From the future, and after the cut-off.
    bad.append(make_candidacy(evil, evil_stake, epoch=EPOCH, now=now + 100, stakes=stakes))
    bad.append(make_candidacy(evil, evil_stake, epoch=EPOCH, now=CLOCK.cutoff(EPOCH) + 1, stakes=stakes))
    # Stake claimed above the chain's figure.
    bad.append(
        make_candidacy(
            seeded_identity(2, "evil"),
            seeded_identity(3, "evil"),
            epoch=EPOCH,
            now=ISSUED,
            stakes=stakes,
            amount=10**12,
            report_stake=10,
        )
    )
    late_now = CLOCK.cutoff(EPOCH) + 2
    for c in bad:
        out = v.receive_candidacy(c, late_now if c.body.issued_at > CLOCK.cutoff(EPOCH) else now, "attacker")
        assert out.decision in (Decision.REJECT, Decision.IGNORE), out
        assert v.proxies(EPOCH) == reference
    # Replays of good ones change nothing either.
    for c in good:
        assert v.receive_candidacy(c, now, "peer").decision is Decision.IGNORE
    assert v.proxies(EPOCH) == reference
    assert v.scores.score("attacker", now) < 0


def test_view_active_set_and_attach_follow_the_epochs() -> None:
    stakes = StakeTable()
    v = view(stakes)
    for c in candidacies(10, stakes=stakes):
        v.receive_candidacy(c, ISSUED + 1)
    at = CLOCK.start(EPOCH) + 1
    assert v.active(at) == list(v.proxies(EPOCH))  # epoch 6 has no candidates
    top = v.attach("client-1", at)
    assert len(top) == 3
    assert v.is_active_proxy(top[0], at)
    v.prune(CLOCK.start(EPOCH + 3))
    assert v.pool.epochs() == []


def _bad_candidacies(stakes: StakeTable) -> list[SignedCandidacy]:
    evil, evil_stake = seeded_identity(0, "evil"), seeded_identity(1, "evil")
    good = candidacies(3)
    out = [
        make_candidacy(evil, evil_stake, epoch=EPOCH, now=ISSUED, amount=10**9),  # stake not on the chain
        attrs.evolve(good[0], body=attrs.evolve(good[0].body, stake_amount=10**9)),  # tampered
        make_candidacy(evil, evil_stake, epoch=EPOCH, now=ISSUED + 1000, stakes=stakes),  # from the future
        make_candidacy(evil, evil_stake, epoch=EPOCH, now=CLOCK.cutoff(EPOCH) + 1, stakes=stakes),  # too late
    ]
    body = attrs.evolve(good[1].body, candidate_key=evil.public_key, peer_id=evil.peer_id)
    data = wire.encode(body)
    out.append(SignedCandidacy(body=body, signature=evil.sign(data), stake_signature=evil.sign(data)))
    return out


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.lists(st.integers(0, 4), max_size=15))
def test_bad_candidacies_in_any_order_never_change_the_election(
    rnd: random.Random, bad_picks: list[int]
) -> None:
    stakes = StakeTable()
    good = candidacies(10, stakes=stakes)
    bad = _bad_candidacies(stakes)
    reference = elect(good, EPOCH, fixed_epoch_seed(EPOCH), ElectionParams(k=8))
    stream = good + [bad[i] for i in bad_picks] + good[:3]
    rnd.shuffle(stream)
    v = view(stakes)
    for rec in stream:
        v.receive_candidacy(rec, ISSUED + 60 if rec.body.issued_at <= ISSUED else CLOCK.cutoff(EPOCH) + 2)
    assert v.proxies(EPOCH) == reference
