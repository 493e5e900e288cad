"""Market benchmark: match latency (10,000 offers), election (1,000 candidates), 1,000-node simulation.

Run: ``python bench/market.py`` (``--quick`` for a smaller simulation).  Prints one table.
Timings are wall-clock on a shared 2-core machine: expect noise.  The match
baseline is a naive filter-and-sort over every offer of the model, measured in
the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's market, not this file

from market.book import OfferBook, WorkerLoad
from market.core import ElectionView
from market.election import ElectionParams, EpochClock, attach, elect
from market.records import SignedOffer, signature_valid
from market.sim import SimConfig, run
from market.testing import fixed_epoch_seed, make_candidacy, make_offer, seeded_identity
from market.validation import OfferValidator, StakeTable

Row = tuple[str, str, str]


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    return s[len(s) // 2], s[min(len(s) - 1, int(0.99 * len(s)))], s[-1]


def _ms(p50: float, p99: float) -> str:
    return f"p50 {p50 * 1e3:.3f} / p99 {p99 * 1e3:.3f} ms"


def _time_each(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def build_book(n: int, rng: random.Random) -> tuple[OfferBook, list[SignedOffer], float]:
    """A book of ``n`` offers of one model, 80 % with a heartbeat; returns the seconds spent inserting."""
    offers = [
        make_offer(
            seeded_identity(i, "bench-worker"), now=0.0, price_prompt=rng.randint(50, 150),
            price_completion=rng.randint(200, 600), capacity=8, seqno=1,
        )
        for i in range(n)
    ]  # fmt: skip
    book = OfferBook(exploration=0.15)
    t = time.perf_counter()
    for rec in offers:
        book.insert(rec, 0.0)
    insert_s = time.perf_counter() - t
    for rec in offers:
        if rng.random() < 0.8:  # most workers heartbeat this proxy
            load = WorkerLoad(
                rng.randint(0, 8), 8, rng.randint(0, 8000), rng.uniform(20, 200), 5.0, 30.0, 1.0
            )
            book.update_load(rec.body.peer_id, load)
    return book, offers, insert_s


def bench_match(n: int = 10_000, calls: int = 2000) -> list[Row]:
    book, offers, insert_s = build_book(n, random.Random(1))
    rows: list[Row] = [(f"book: insert {n:,} validated offers", f"{insert_s * 1e6 / n:.1f} us/offer", "")]
    mrng = random.Random(2)

    def one(cap_c: int) -> Callable[[], object]:
        return lambda: book.match(
            "tiny", max_price_prompt=1000, max_price_completion=cap_c, min_tier="none", now=1.0, rng=mrng
        )

    for label, cap in (("cap near the median", 450), ("generous cap, all eligible", 10**6)):
        # The median of 5 rounds' percentiles: other processes share these 2 cores.
        rounds = [_percentiles(_time_each(one(cap), calls // 5)) for _ in range(5)]
        p50 = statistics.median(r[0] for r in rounds)
        p99 = statistics.median(r[1] for r in rounds)
        verdict = "PASS (<= 5 ms)" if p99 <= 0.005 else "FAIL (> 5 ms)"
        rows.append((f"match, {n:,} offers of one model, {label}", _ms(p50, p99), verdict))

    def naive() -> object:
        live = [
            r for r in offers
            if r.body.price_completion <= 450 and r.body.price_prompt <= 1000 and r.body.expires_at > 1.0
        ]  # fmt: skip
        live.sort(key=lambda r: (r.body.price_prompt + r.body.price_completion, r.body.peer_id))
        return live[:3]

    p50, p99, _ = _percentiles(_time_each(naive, 300))
    rows.append(("baseline: naive filter + sort of all offers per call", _ms(p50, p99), ""))
    return rows


def bench_validation(n: int = 2000) -> list[Row]:
    offers = [make_offer(seeded_identity(i, "bench-v"), now=0.0, seqno=1) for i in range(n)]
    t = time.perf_counter()
    for r in offers:
        signature_valid(r)
    sig_s = time.perf_counter() - t
    v = OfferValidator()
    t = time.perf_counter()
    ok = sum(v.validate(r, 1.0, "relay").accepted for r in offers)
    dt = time.perf_counter() - t
    return [
        ("offer signature check alone (encode + Ed25519)", f"{sig_s * 1e6 / n:.0f} us", ""),
        ("validate a new offer (+ schema, peer id, replay)", f"{dt * 1e6 / n:.0f} us ({ok}/{n} ok)", ""),
    ]


def bench_election(n: int = 1000, k: int = 32) -> list[Row]:
    clock = EpochClock(0.0, 3600.0, 3600.0, 300.0)
    stakes = StakeTable()
    cands = [
        make_candidacy(
            seeded_identity(i, "bench-cand"), seeded_identity(i, "bench-stake"), epoch=5, now=100.0,
            amount=10**9 + (i * 7919) % 10**10, operator=f"op-{i // 3}", stakes=stakes, lifetime=3 * 3600,
        )
        for i in range(n)
    ]  # fmt: skip
    view = ElectionView(clock, fixed_epoch_seed, stakes, params=ElectionParams(k=k))
    t = time.perf_counter()
    accepted = sum(view.receive_candidacy(c, 200.0, "relay").accepted for c in cands)
    validate_s = time.perf_counter() - t
    params = ElectionParams(k=k)
    times = _time_each(lambda: elect(cands, 5, fixed_epoch_seed(5), params), 20)
    chosen = elect(cands, 5, fixed_epoch_seed(5), params)
    nodes = [f"node-{i}" for i in range(1000)]
    t = time.perf_counter()
    for node in nodes:
        attach(node, chosen, 5, 3)
    attach_s = time.perf_counter() - t
    return [
        (f"validate {n} candidacies (2 signatures each)", f"{validate_s * 1e3:.0f} ms ({accepted} ok)", ""),
        (f"elect K={k} from {n} candidates", f"median {statistics.median(times) * 1e3:.1f} ms", ""),
        ("attach 1,000 nodes to their top 3 (rendezvous)", f"{attach_s * 1e3:.1f} ms", ""),
    ]


def bench_sim(quick: bool) -> list[Row]:
    cfg = SimConfig(nodes=200, candidates=16, k=8, workers=120, duration=600.0) if quick else SimConfig()
    r = run(cfg)
    label = f"sim {r.nodes} nodes ({r.candidates} cand., {r.workers} workers, {r.clients} clients)"
    return [
        (label, f"{r.virtual_seconds:.0f} s virtual in {r.wall_seconds:.0f} s wall", ""),
        (
            f"  election agreement, {r.epochs_checked} epochs",
            f"{100 * r.election_agreement:.2f} %",
            "PASS" if r.election_agreement == 1.0 else "FAIL",
        ),
        (
            f"  offer propagation to proxies ({r.offers_published} offers)",
            f"p50 {r.propagation_p50 * 1e3:.0f} / p99 {r.propagation_p99 * 1e3:.0f} ms, "
            f"{100 * r.delivery_ratio:.2f} % delivered",
            "",
        ),
        (
            f"  stale selections ({r.matches} matches)",
            f"{r.stale_selections} ({100 * r.stale_rate:.3f} %)",
            "PASS" if r.stale_rate <= 0.001 else "FAIL",
        ),
        ("  outdated price / crashed worker selections", f"{r.outdated_price} / {r.crashed_selections}", ""),
        (
            "  flood: accepted per proxy / published; forged accepted",
            f"{r.spam_accepted_max} / {r.spam_published}; {r.forged_accepted} of {r.forged_published}",
            "PASS" if r.forged_accepted == 0 else "FAIL",
        ),
        ("  message copies / dropped", f"{r.copies} / {r.dropped}", ""),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a 200-node simulation instead of 1,000")
    args = parser.parse_args(argv)
    rows = bench_match() + bench_validation() + bench_election() + bench_sim(args.quick)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'market benchmark':<{width}}  {'result':<{vwidth}}  target")
    print("-" * (width + vwidth + 10))
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {verdict}")
    return 1 if any(v == "FAIL" for _, _, v in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
