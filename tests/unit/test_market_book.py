"""The offer book: insert, expire, filters, ranking, exploration, and bad input never changing it."""

from __future__ import annotations

import random

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from market.book import OfferBook, RankWeights, WorkerLoad
from market.core import ProxyCore
from market.records import SignedOffer, Verdict, sign_offer, sign_verdict
from market.testing import make_offer, offer_body, seeded_identity
from overlay import wire

WORKERS = [seeded_identity(i, "worker") for i in range(12)]
PROXY = seeded_identity(0, "proxy")
EVIL = seeded_identity(1, "evil")


def book_with(*offers: SignedOffer, exploration: float = 0.0) -> OfferBook:
    book = OfferBook(exploration=exploration)
    for r in offers:
        assert book.insert(r, 0.0)
    return book


def ids(offers: tuple[SignedOffer, ...]) -> list[str]:
    return [r.body.peer_id for r in offers]


def match(book: OfferBook, **kw: object) -> tuple[SignedOffer, ...]:
    args: dict[str, object] = {
        "max_price_prompt": 10_000,
        "max_price_completion": 10_000,
        "min_tier": "none",
        "now": 1.0,
        "rng": random.Random(0),
        "count": 3,
    }
    args.update(kw)
    return book.match("tiny", **args).offers  # type: ignore[arg-type]


def test_insert_replace_withdraw_and_lookup() -> None:
    w = WORKERS[0]
    book = OfferBook()
    assert book.insert(make_offer(w, now=0.0, seqno=1), 0.0)
    assert not book.insert(make_offer(w, now=0.0, seqno=1), 0.0)  # same seqno
    assert book.insert(make_offer(w, now=0.0, seqno=2, price_completion=5), 0.0)
    got = book.get(w.peer_id)
    assert got is not None
    assert got.body.price_completion == 5
    assert len(book) == 1
    assert book.models() == ["tiny"]
    assert book.insert(make_offer(w, now=0.0, seqno=3, capacity=0), 0.0)  # withdrawal
    assert len(book) == 0
    assert book.models() == []
    assert not book.insert(make_offer(w, now=0.0, seqno=4, lifetime=10), 20.0)  # already expired


def test_expiry_is_lazy_but_never_served() -> None:
    a, b = WORKERS[:2]
    book = book_with(make_offer(a, now=0.0, lifetime=60), make_offer(b, now=0.0, lifetime=120))
    assert ids(match(book, now=61.0)) == [b.peer_id]  # a expired, not yet swept
    assert book.expire(61.0) == [a.peer_id]
    assert [r.body.peer_id for r in book.offers("tiny", 61.0)] == [b.peer_id]
    # A replaced offer's old deadline does not remove the new one.
    book.insert(make_offer(b, now=100.0, seqno=2, lifetime=600), 100.0)
    assert book.expire(130.0) == []
    assert b.peer_id in book


def test_filters_price_caps_tier_exclude_and_full_workers() -> None:
    cheap, mid, dear, prompty = WORKERS[:4]
    book = book_with(
        make_offer(cheap, now=0.0, price_completion=100),
        make_offer(mid, now=0.0, price_completion=200),
        make_offer(dear, now=0.0, price_completion=900),
        make_offer(prompty, now=0.0, price_completion=150, price_prompt=5000),
    )
    assert set(ids(match(book, max_price_completion=250, max_price_prompt=1000, count=8))) == {
        cheap.peer_id,
        mid.peer_id,
    }
    assert (
        ids(match(book, max_price_completion=250, exclude=(cheap.peer_id, mid.peer_id, prompty.peer_id)))
        == []
    )
    assert ids(match(book, min_tier="tdx")) == []
    book.update_load(cheap.peer_id, WorkerLoad(4, 4, 0, 50.0, 2.0, 5.0, at=1.0))
    assert cheap.peer_id not in ids(match(book, count=8))
    # The load is forgotten after load_ttl: the worker is matchable again.
    book.expire(20.0)
    assert cheap.peer_id in ids(match(book, count=8, now=20.0))


def test_price_hint_names_the_cheapest_price_when_nothing_fits() -> None:
    book = book_with(make_offer(WORKERS[0], now=0.0, price_completion=700))
    result = book.match(
        "tiny",
        max_price_prompt=1000,
        max_price_completion=500,
        min_tier="none",
        now=1.0,
        rng=random.Random(1),
    )
    assert result.offers == ()
    assert result.price_hint == 700
    result = book.match(
        "other",
        max_price_prompt=1000,
        max_price_completion=500,
        min_tier="none",
        now=1.0,
        rng=random.Random(1),
    )
    assert result.price_hint is None


def test_attested_offers_need_an_ok_verdict() -> None:
    w = WORKERS[0]
    report = b"q" * 32
    rec = make_offer(w, now=0.0, tier="tdx", attestation_hash=report)
    book = book_with(rec)
    assert ids(match(book, min_tier="tdx")) == []

    def verdict(status: str, tier: str = "tdx", verified_at: float = 0.5) -> Verdict:
        return Verdict(
            PROXY.public_key,
            PROXY.peer_id,
            w.peer_id,
            report,
            tier,
            status,
            b"m" * 48,
            "",
            verified_at,
            300.0,
        )

    assert book.add_verdict(sign_verdict(PROXY, verdict("rejected")))
    assert ids(match(book, min_tier="tdx")) == []
    assert book.add_verdict(sign_verdict(PROXY, verdict("ok", verified_at=0.6)))
    assert not book.add_verdict(sign_verdict(PROXY, verdict("ok", verified_at=0.6)))
    result = book.match(
        "tiny",
        max_price_prompt=10_000,
        max_price_completion=10_000,
        min_tier="tdx",
        now=1.0,
        rng=random.Random(0),
    )
    assert ids(result.offers) == [w.peer_id]
    assert [v.body.status for v in result.verdicts] == ["ok"]
    assert ids(match(book, min_tier="none")) == [w.peer_id]  # a higher tier satisfies a lower minimum
    assert ids(match(book, min_tier="tdx", now=301.0)) == []  # the verdict expired


def test_ranking_prefers_cheap_idle_fast_reputable() -> None:
    cheap, dear = WORKERS[:2]
    book = book_with(
        make_offer(cheap, now=0.0, price_completion=100), make_offer(dear, now=0.0, price_completion=900)
    )
    assert ids(match(book, count=2)) == [cheap.peer_id, dear.peer_id]
    # Busy cheap worker: 3 running x 30 s each; the dearer idle one wins.
    book.update_load(cheap.peer_id, WorkerLoad(3, 8, 4000, 20.0, 30.0, 80.0, at=1.0))
    book.update_load(dear.peer_id, WorkerLoad(0, 8, 0, 200.0, 2.0, 5.0, at=1.0))
    assert ids(match(book, count=2)) == [dear.peer_id, cheap.peer_id]
    # Reputation breaks a tie between equal offers.
    a, b = WORKERS[2:4]
    book2 = book_with(make_offer(a, now=0.0), make_offer(b, now=0.0))
    rep = {a.peer_id: 0.1, b.peer_id: 0.9}
    assert ids(match(book2, count=1, reputation=lambda p, now: rep[p])) == [b.peer_id]


def test_exploration_rate_follows_the_injected_rng() -> None:
    book = book_with(
        *(make_offer(w, now=0.0, price_completion=100 + i) for i, w in enumerate(WORKERS)), exploration=0.15
    )
    rng = random.Random(42)
    n = 4000
    explored = sum(
        book.match(
            "tiny", max_price_prompt=10_000, max_price_completion=10_000, min_tier="none", now=1.0, rng=rng
        ).explored
        for _ in range(n)
    )
    assert 0.12 < explored / n < 0.18
    # Same seed, same answers.
    r1 = [ids(match(book, rng=random.Random(7))) for _ in range(3)]
    r2 = [ids(match(book, rng=random.Random(7))) for _ in range(3)]
    assert r1 == r2


def reference_score(book: OfferBook, rec: SignedOffer, cap_sum: int, now: float) -> float:
    w: RankWeights = book.weights
    o = rec.body
    score = w.price * (o.price_prompt + o.price_completion) / cap_sum
    load = book.load_of(o.peer_id)
    if load is not None and now - load.at <= book.load_ttl:
        busy = load.active * load.mean_duration
        latency = load.rtt_ms / 1000 + (load.queue_tokens + 100) / load.tok_s
        score += w.load * busy / (busy + w.load_scale) + w.latency * latency / (latency + w.latency_scale)
    else:
        score += (w.load + w.latency) * 0.5
    return score + w.reputation * 0.5


@settings(max_examples=60, deadline=None)
@given(
    prices=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000)), min_size=1, max_size=12),
    loads=st.lists(
        st.none() | st.tuples(st.integers(0, 8), st.integers(0, 5000), st.floats(1, 100), st.floats(0, 60)),
        min_size=12,
        max_size=12,
    ),
    cap=st.tuples(st.integers(0, 1000), st.integers(0, 1000)),
    count=st.integers(1, 8),
)
def test_match_returns_the_best_scores_like_a_brute_force_ranking(
    prices: list[tuple[int, int]],
    loads: list[tuple[int, int, float, float] | None],
    cap: tuple[int, int],
    count: int,
) -> None:
    book = OfferBook(exploration=0.0)
    offers = []
    for w, (pp, pc), load in zip(WORKERS, prices, loads, strict=False):
        rec = make_offer(w, now=0.0, price_prompt=pp, price_completion=pc)
        book.insert(rec, 0.0)
        offers.append(rec)
        if load is not None:
            active, queue, tok_s, duration = load
            book.update_load(w.peer_id, WorkerLoad(active, 6, queue, tok_s, duration, 10.0, at=1.0))
    result = book.match(
        "tiny",
        max_price_prompt=cap[0],
        max_price_completion=cap[1],
        min_tier="none",
        now=1.0,
        rng=random.Random(0),
        count=count,
    )
    cap_sum = max(1, cap[0] + cap[1])
    eligible = [
        r
        for r in offers
        if r.body.price_prompt <= cap[0]
        and r.body.price_completion <= cap[1]
        and not ((ld := book.load_of(r.body.peer_id)) is not None and ld.active >= ld.max_active)
    ]
    expected = sorted(reference_score(book, r, cap_sum, 1.0) for r in eligible)[:count]
    got = [reference_score(book, r, cap_sum, 1.0) for r in result.offers]
    assert got == sorted(got)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert abs(g - e) < 1e-12


# ----------------------------------------------------------------------------- bad input


def snapshot(book: OfferBook) -> list[bytes]:
    return sorted(wire.encode(r) for m in book.models() for r in book.offers(m, 0.0))


class BookUnderAttack(RuleBasedStateMachine):
    """Honest offers move the book; forged, foreign, absurd, future, expired or replayed ones never do."""

    def __init__(self) -> None:
        super().__init__()
        self.core = ProxyCore()
        self.now = 1000.0
        self.seqno = {w.peer_id: 0 for w in WORKERS[:4]}
        self.sent: list[SignedOffer] = []

    def _submit_bad(self, rec: SignedOffer) -> None:
        before = snapshot(self.core.book)
        out = self.core.receive_offer(rec, self.now, "attacker")
        assert not out.accepted, out
        assert snapshot(self.core.book) == before

    @rule(i=st.integers(0, 3), price=st.integers(0, 2000), cap=st.integers(0, 8), dt=st.floats(0, 40))
    def honest(self, i: int, price: int, cap: int, dt: float) -> None:
        self.now += dt
        w = WORKERS[i]
        self.seqno[w.peer_id] += 1
        rec = make_offer(w, now=self.now, seqno=self.seqno[w.peer_id], price_completion=price, capacity=cap)
        if self.core.receive_offer(rec, self.now, "honest").accepted:
            self.sent.append(rec)

    @rule(i=st.integers(0, 3))
    def forged(self, i: int) -> None:
        body = offer_body(WORKERS[i], now=self.now, seqno=10**9)
        self._submit_bad(SignedOffer(body=body, signature=EVIL.sign(wire.encode(body))))

    @rule(i=st.integers(0, 3))
    def foreign_peer_id(self, i: int) -> None:
        body = attrs.evolve(offer_body(EVIL, now=self.now, seqno=10**9), peer_id=WORKERS[i].peer_id)
        self._submit_bad(sign_offer(EVIL, body))

    @rule(i=st.integers(0, 3), price=st.integers(10**12 + 1, 2**63))
    def absurd(self, i: int, price: int) -> None:
        self._submit_bad(make_offer(WORKERS[i], now=self.now, seqno=10**9, price_completion=price))

    @rule(i=st.integers(0, 3), ahead=st.floats(31, 1e6))
    def from_the_future(self, i: int, ahead: float) -> None:
        self._submit_bad(make_offer(WORKERS[i], now=self.now + ahead, seqno=10**9))

    @rule(i=st.integers(0, 3))
    def expired(self, i: int) -> None:
        self._submit_bad(make_offer(WORKERS[i], now=self.now - 700, seqno=10**9, lifetime=600))

    @precondition(lambda self: bool(self.sent))
    @rule(k=st.integers(0, 10**6))
    def replay(self, k: int) -> None:
        self._submit_bad(self.sent[k % len(self.sent)])

    @rule(dt=st.floats(0, 400))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.core.tick(self.now)

    @invariant()
    def book_holds_only_accepted_latest_offers(self) -> None:
        accepted = {wire.encode(r) for r in self.sent}
        for m in self.core.book.models():
            for r in self.core.book.offers(m, self.now):
                assert wire.encode(r) in accepted
                assert r.body.seqno == self.core.validator.last_seqno(r.body.peer_id)
                assert r.body.capacity > 0


TestBookUnderAttack = BookUnderAttack.TestCase
TestBookUnderAttack.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_suspended_workers_sit_out_until_the_suspension_ends() -> None:
    a, b = WORKERS[:2]
    book = book_with(
        make_offer(a, now=0.0, price_completion=100), make_offer(b, now=0.0, price_completion=200)
    )
    book.suspend(a.peer_id, until=60.0)
    assert book.suspended(a.peer_id, 1.0)
    assert ids(match(book, count=2)) == [b.peer_id]
    assert ids(match(book, count=2, now=61.0)) == [a.peer_id, b.peer_id]
    book.expire(61.0)
    assert not book.suspended(a.peer_id, 61.0)
