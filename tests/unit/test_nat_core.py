"""The pure NAT cores: the relay's book, reservation keeping, reachability, dial-back rules, addresses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from overlay.addrs import circuit_addr, expand_unspecified, ip_class, parse_circuit, strip_peer
from overlay.errors import DialError, TransportError
from overlay.reach import DialBackLimiter, Reachability, dialable_for, may_vouch
from overlay.relaycore import Circuit, Refusal, RelayBook, RelayLimits, RelayRefused, Reserved, Status
from overlay.reserve import KeeperCore

PEERS = [f"peer{i}" for i in range(6)]
IPS = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
LIMITS = RelayLimits(
    reservation_ttl_s=100.0,
    max_reservations=4,
    max_reservations_per_ip=2,
    reserve_rate=3,
    reserve_window_s=10.0,
    max_circuits=5,
    max_circuits_per_destination=2,
    max_circuits_per_source=2,
    circuit_duration_s=50.0,
    circuit_bytes=1000,
)


# --------------------------------------------------------------------------- the relay's book


def test_reservation_refusals_are_typed() -> None:
    book = RelayBook(LIMITS)
    assert isinstance(book.reserve("a", IPS[0], 0.0), Reserved)
    renewed = book.reserve("a", IPS[0], 1.0)
    assert isinstance(renewed, Reserved)
    assert renewed.renewed
    assert renewed.expires == 101.0
    denied = book.reserve("b", IPS[0], 0.0, allowed=False)
    assert isinstance(denied, Refusal)
    assert (denied.status, denied.reason) == (Status.PERMISSION_DENIED, "not_a_worker")
    err = denied.error()
    assert isinstance(err, RelayRefused)
    assert isinstance(err, TransportError)
    assert err.reason == "not_a_worker"
    assert isinstance(book.reserve("c", IPS[0], 0.0), Reserved)
    ip_full = book.reserve("d", IPS[0], 0.0)  # a third reservation from one IP
    assert isinstance(ip_full, Refusal)
    assert ip_full.reason == "ip_full"
    book.reserve("e", IPS[1], 0.0)
    book.reserve("f", IPS[2], 0.0)
    full = book.reserve("g", IPS[2], 0.0)
    assert isinstance(full, Refusal)
    assert (full.status, full.reason) == (Status.RESERVATION_REFUSED, "relay_full")
    assert book.statistics().refused == {"not_a_worker": 1, "ip_full": 1, "relay_full": 1}


def test_a_reservation_flood_is_cut_off_and_lapses() -> None:
    book = RelayBook(LIMITS)
    verdicts = [book.reserve("flooder", IPS[0], t * 0.1) for t in range(10)]
    assert all(isinstance(v, Reserved) for v in verdicts[:3])
    assert all(isinstance(v, Refusal) and v.reason == "rate_limited" for v in verdicts[3:])
    assert isinstance(book.reserve("flooder", IPS[0], 11.0), Reserved)  # the window moved on
    assert book.has_reservation("flooder", 110.0)
    assert not book.has_reservation("flooder", 111.5)
    assert book.expire(112.0) == ["flooder"]
    assert book.statistics().reservations == 0


def test_circuits_need_a_reserved_destination_and_respect_limits() -> None:
    book = RelayBook(LIMITS)
    no = book.open_circuit("src", "worker", 0.0)
    assert isinstance(no, Refusal)
    assert (no.status, no.reason) == (Status.NO_RESERVATION, "no_reservation")
    book.reserve("worker", IPS[0], 0.0)
    assert isinstance(book.open_circuit("worker", "worker", 0.0), Refusal)
    c1 = book.open_circuit("src", "worker", 0.0)
    c2 = book.open_circuit("src2", "worker", 0.0)
    assert isinstance(c1, Circuit)
    assert isinstance(c2, Circuit)
    busy = book.open_circuit("src3", "worker", 0.0)
    assert isinstance(busy, Refusal)
    assert busy.reason == "destination_busy"
    book.close_circuit(c2)
    assert book.account(c1, 600, 1.0) is None
    over = book.account(c1, 600, 2.0)
    assert isinstance(over, Refusal)
    assert over.reason == "data_exceeded"
    late = book.account(c1, 1, 51.0)
    assert isinstance(late, Refusal)
    assert late.reason == "duration_exceeded"
    assert book.statistics().bytes_relayed == 600


class RelayBookMachine(RuleBasedStateMachine):
    """Whatever the order of requests, the book never holds more than its limits allow."""

    def __init__(self) -> None:
        super().__init__()
        self.book = RelayBook(LIMITS)
        self.now = 0.0
        self.open: list[Circuit] = []

    @rule(dt=st.floats(min_value=0.0, max_value=30.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.book.expire(self.now)

    @rule(peer=st.sampled_from(PEERS), ip=st.sampled_from(IPS), allowed=st.booleans())
    def reserve(self, peer: str, ip: str, allowed: bool) -> None:
        v = self.book.reserve(peer, ip, self.now, allowed=allowed)
        if not allowed:
            assert isinstance(v, Refusal)
        if isinstance(v, Reserved):
            assert v.expires == self.now + LIMITS.reservation_ttl_s
            assert self.book.has_reservation(peer, self.now)

    @rule(src=st.sampled_from(PEERS), dst=st.sampled_from(PEERS))
    def connect(self, src: str, dst: str) -> None:
        held = self.book.has_reservation(dst, self.now)
        c = self.book.open_circuit(src, dst, self.now)
        if isinstance(c, Circuit):
            assert held
            assert src != dst
            self.open.append(c)
        else:
            assert isinstance(c.status, Status)

    @precondition(lambda self: bool(self.open))
    @rule(i=st.integers(min_value=0, max_value=10), n=st.integers(min_value=0, max_value=700))
    def relay_bytes(self, i: int, n: int) -> None:
        c = self.open[i % len(self.open)]
        before = c.carried
        refusal = self.book.account(c, n, self.now)
        if refusal is None:
            assert c.carried == before + n
        else:
            assert c.carried == before
            self.book.close_circuit(c)
            self.open.remove(c)

    @precondition(lambda self: bool(self.open))
    @rule(i=st.integers(min_value=0, max_value=10))
    def close(self, i: int) -> None:
        c = self.open.pop(i % len(self.open))
        self.book.close_circuit(c)

    @invariant()
    def within_limits(self) -> None:
        circuits = self.book.circuits()
        assert len(circuits) <= LIMITS.max_circuits
        for p in PEERS:
            assert sum(1 for c in circuits if c.dst == p) <= LIMITS.max_circuits_per_destination
            assert sum(1 for c in circuits if c.src == p) <= LIMITS.max_circuits_per_source
        for c in circuits:
            assert c.carried <= LIMITS.circuit_bytes
        assert self.book.statistics().reservations <= LIMITS.max_reservations


TestRelayBookMachine = RelayBookMachine.TestCase
TestRelayBookMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# --------------------------------------------------------------------------- keeping reservations


def test_keeper_reserves_renews_backs_off_and_follows_the_wanted_set() -> None:
    k = KeeperCore(renew_fraction=0.5, renew_margin_s=10.0, retry_s=2.0, max_retry_s=16.0)
    assert k.want(["r1", "r2"], 0.0) == []
    assert sorted(k.due(0.0)) == ["r1", "r2"]
    k.reserved("r1", 100.0, 0.0)
    assert k.due(1.0) == ["r2"]
    assert k.held(1.0) == ["r1"]
    assert k.due(50.0) == ["r1", "r2"]  # renewed at half its life
    delays = [k.failed("r2", "refused", t) for t in (0.0, 2.0, 6.0, 14.0, 30.0, 46.0)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    assert k.errors() == {"r2": "refused"}
    k.reserved("r2", 300.0, 50.0)
    assert k.errors() == {}
    assert k.want(["r2", "r3"], 60.0) == ["r1"]  # the election moved: r1 is dropped at once
    assert k.held(60.0) == ["r2"]
    assert k.due(60.0) == ["r3"]
    nxt = k.next_wake()
    assert nxt == 60.0


def test_keeper_renews_short_reservations_before_they_lapse() -> None:
    k = KeeperCore(renew_fraction=0.9, renew_margin_s=30.0)
    k.want(["r"], 0.0)
    k.reserved("r", 40.0, 0.0)
    assert k.due(9.9) == []
    assert k.due(10.0) == ["r"]  # 30 s margin beats 90 % of a 40 s life
    k.failed("r", "timeout", 50.0)
    assert k.held(50.0) == []


@given(st.lists(st.tuples(st.sampled_from(["ok", "fail"]), st.floats(0.0, 1000.0)), max_size=30))
def test_keeper_never_schedules_in_the_past(events: list[tuple[str, float]]) -> None:
    k = KeeperCore()
    k.want(["r"], 0.0)
    now = 0.0
    for kind, dt in events:
        now += dt
        if kind == "ok":
            k.reserved("r", now + 60.0, now)
        else:
            k.failed("r", "x", now)
        nxt = k.next_wake()
        assert nxt is not None
        assert nxt >= now


# --------------------------------------------------------------------------- reachability


def test_reachability_needs_agreement_and_keeps_its_status_on_a_tie() -> None:
    r = Reachability(need=2, max_age_s=100.0)
    assert r.status(0.0) == "unknown"
    assert r.record("s1", True, "/ip4/198.18.0.9/tcp/1", 0.0) == "public"  # one server is all there is
    assert r.record("s2", False, "", 1.0) == "public"  # a tie keeps the status
    assert r.record("s3", False, "", 2.0) == "private"
    assert r.public_addrs(2.0) == ("/ip4/198.18.0.9/tcp/1",)
    assert r.status(150.0) == "unknown"  # every verdict is too old
    forced = Reachability(forced="private")
    forced.record("s1", True, "", 0.0)
    assert forced.status(0.0) == "private"
    assert forced.statistics(0.0).forced
    with pytest.raises(ValueError):
        Reachability(forced="sometimes")


def test_dial_back_rules() -> None:
    assert dialable_for("198.18.0.7", ("/ip4/10.0.0.2/tcp/4001", "/ip4/198.18.0.7/tcp/4002", "/dns/x")) == [
        "/ip4/198.18.0.7/tcp/4001",
        "/ip4/198.18.0.7/tcp/4002",
    ]  # only the observed IP is dialled, at the requested ports
    assert dialable_for("1.2.3.4", ("/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/99999")) == []
    assert len(dialable_for("1.2.3.4", tuple(f"/ip4/1.2.3.4/tcp/{p}" for p in range(1, 9)))) == 3
    assert may_vouch("198.18.0.7", "198.18.0.1")
    assert may_vouch("127.0.0.1", "127.0.0.1")  # a devnet judges a devnet
    assert not may_vouch("192.168.1.5", "198.18.0.1")  # a LAN address seen from outside: no verdict
    assert may_vouch("192.168.1.5", "192.168.1.1")
    assert not may_vouch("not an ip", "127.0.0.1")
    lim = DialBackLimiter(per_peer=2, per_ip=3, window_s=10.0)
    assert [lim.allow("a", "1.1.1.1", t) for t in (0, 1, 2)] == [True, True, False]
    assert lim.allow("b", "1.1.1.1", 3)
    assert not lim.allow("c", "1.1.1.1", 4)  # the IP's budget is spent
    assert lim.allow("a", "1.1.1.1", 20)


# --------------------------------------------------------------------------- addresses


def test_addresses() -> None:
    assert ip_class("127.0.0.1") == "loopback"
    assert ip_class("192.168.0.1") == "private"
    assert ip_class("100.64.1.1") == "private"
    assert ip_class("198.18.0.1") == "public"
    assert ip_class("8.8.8.8") == "public"
    assert ip_class("0.0.0.0") == "invalid"
    assert ip_class("nope") == "invalid"
    got = expand_unspecified(
        ["/ip4/0.0.0.0/tcp/5", "/ip4/1.2.3.4/tcp/6"], ["127.0.0.1", "192.168.1.2", "8.8.8.8"]
    )
    assert got == [
        "/ip4/8.8.8.8/tcp/5",
        "/ip4/192.168.1.2/tcp/5",
        "/ip4/127.0.0.1/tcp/5",
        "/ip4/1.2.3.4/tcp/6",
    ]
    a = circuit_addr("/ip4/1.2.3.4/tcp/5/p2p/R", "R", "T")
    assert a == "/ip4/1.2.3.4/tcp/5/p2p/R/p2p-circuit/p2p/T"
    c = parse_circuit(a)
    assert (c.relay_addr, c.relay_id, c.target) == ("/ip4/1.2.3.4/tcp/5", "R", "T")
    assert parse_circuit(circuit_addr("/ip4/1.2.3.4/tcp/5", "R")).target == ""
    assert strip_peer("/ip4/1.2.3.4/tcp/5/p2p/X") == "/ip4/1.2.3.4/tcp/5"
    assert strip_peer(a) == "/ip4/1.2.3.4/tcp/5/p2p/R/p2p-circuit"  # the dialer appends the target
    for bad in (
        "/ip4/1.2.3.4/tcp/5",
        "/p2p-circuit/p2p/T",
        "/ip4/1/tcp/2/p2p/R/p2p-circuit/x",
        "/p2p/R/p2p-circuit",
    ):
        with pytest.raises(DialError):
            parse_circuit(bad)


@given(st.text(max_size=200))
def test_parse_circuit_only_raises_dial_error(text: str) -> None:
    try:
        c = parse_circuit(text)
    except DialError:
        return
    assert c.relay_id
    assert c.relay_addr
