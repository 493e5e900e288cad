"""The market simulation: many nodes' cores over a lossy, reordering gossip mesh in virtual time."""

from __future__ import annotations

import attrs
import pytest

from market.sim import SimConfig, SimReport, Simulation, run

SMALL = SimConfig(nodes=150, candidates=12, k=6, workers=90, spammers=2, duration=600.0, match_rate=10.0)


@pytest.fixture(scope="module")
def report() -> SimReport:
    return run(SMALL)


def test_every_node_computes_the_same_proxies(report: SimReport) -> None:
    r = report
    assert r.epochs_checked >= 4
    assert r.election_agreement == 1.0


def test_offers_reach_every_proxy_candidate_quickly(report: SimReport) -> None:
    r = report
    assert r.offers_published > 300
    assert r.delivery_ratio > 0.995
    assert SMALL.latency[0] <= r.propagation_p50 <= r.propagation_p99
    assert r.propagation_p99 < 1.0  # a few hops of at most 75 ms each


def test_stale_selections_stay_under_a_tenth_of_a_percent(report: SimReport) -> None:
    r = report
    assert r.matches > 3000
    assert r.stale_rate <= 0.001


def test_floods_are_throttled_and_forgeries_never_accepted(report: SimReport) -> None:
    r = report
    assert r.forged_published > 0
    assert r.forged_accepted == 0
    # One accepted flood offer per spammer per 10 s of issue time, at most, at any proxy.
    bound = SMALL.spammers * (SMALL.duration / 10 + 1)
    assert 0 < r.spam_accepted_max <= bound
    assert r.spam_published >= 5 * r.spam_accepted_max


def test_agreement_survives_heavy_loss() -> None:
    r = run(attrs.evolve(SMALL, nodes=80, candidates=8, k=4, workers=40, duration=400.0, drop=0.25, seed=3))
    assert r.election_agreement == 1.0
    assert r.delivery_ratio > 0.99


def test_a_seed_reproduces_a_run_exactly() -> None:
    cfg = attrs.evolve(SMALL, nodes=60, candidates=6, k=3, workers=30, duration=250.0, seed=9)
    a = attrs.asdict(Simulation(cfg).run())
    b = attrs.asdict(Simulation(cfg).run())
    a.pop("wall_seconds")
    b.pop("wall_seconds")
    assert a == b


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="candidates"):
        Simulation(SimConfig(nodes=10, candidates=0, workers=5))
    with pytest.raises(ValueError, match="candidates"):
        Simulation(SimConfig(nodes=10, candidates=5, workers=6))
