"""The channel core: Hypothesis state machine (conservation, no replay, always settleable,
crash at any point), plus persistence discipline and bad input."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from overlay.errors import ChannelError, InsufficientFunds, LocalProtocolError, StaleState
from ton import contract as C
from ton.channel import Channel, Persist, Received, Send, Settle, SettlementPolicy
from ton.keys import KeyPair
from ton.messages import PayState
from ton.store import MemoryKVStore

KA, KB = KeyPair.from_seed(b"a" * 32), KeyPair.from_seed(b"b" * 32)
PARAMS = C.ChannelParams(
    channel_id=42, key_a=KA.public, key_b=KB.public, addr_a="0:" + "aa" * 32, addr_b="0:" + "bb" * 32
)
DEP_A, DEP_B = 1_000_000, 200_000


def chain_data(**kw: int) -> C.ChannelData:
    base = dict(
        status=C.Status.OPEN, channel_id=42, key_a=KA.public, key_b=KB.public, deposit_a=DEP_A,
        deposit_b=DEP_B, withdrawn_a=0, withdrawn_b=0, sent_a=0, sent_b=0, seqno_a=0, seqno_b=0,
        quarantine_duration=3600, fine=1,
    )  # fmt: skip
    base.update(kw)
    return C.ChannelData(**base)  # type: ignore[arg-type]


class Side:
    """A channel core with its store, run like the trio shell runs it."""

    def __init__(self, party: int, key: KeyPair) -> None:
        self.party, self.key = party, key
        self.store = MemoryKVStore()
        self.core = Channel(PARAMS, party, key)
        self.run(self.core.sync_onchain(chain_data(), 0.0))

    def run(self, effects: list[object], *, crash_before_persist: bool = False) -> list[object]:
        out: list[object] = []
        for e in effects:
            if isinstance(e, Persist):
                if crash_before_persist:
                    self.restart()
                    return []
                self.store.write(e.namespace, e.key, e.blob)
                self.core.persisted(e.update_id)
            else:
                out.append(e)
        return out

    def restart(self) -> None:
        blob = self.store.read("channel", PARAMS.channel_id.to_bytes(16, "big").hex())
        assert blob is not None
        self.core = Channel.restore(PARAMS, self.key, blob)


class ChannelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Side(C.PARTY_A, KA), Side(C.PARTY_B, KB)
        self.link: list[PayState] = []  # in flight, any order
        self.delivered: list[PayState] = []
        self.signed: dict[tuple[int, int], int] = {}  # (party, seqno) -> sent ever sent on the wire
        self.b_seen_seqno = 0

    def side(self, party: int) -> Side:
        return self.a if party == C.PARTY_A else self.b

    @rule(
        party=st.sampled_from([0, 1]),
        amount=st.integers(1, 300_000),
        crash=st.sampled_from(["no", "before", "after"]),
    )
    def pay(self, party: int, amount: int, crash: str) -> None:
        s = self.side(party)
        try:
            effects = s.core.pay(amount)
        except InsufficientFunds:
            assert amount > s.core.available()
            return
        sends = s.run(effects, crash_before_persist=crash == "before")
        if crash == "after":  # persisted, crashed before sending: the restart resends
            s.restart()
            sends = s.core.resend()
        for e in sends:
            assert isinstance(e, Send)
            msg = e.msg
            assert isinstance(msg, PayState)
            key = (msg.party, msg.seqno)
            assert self.signed.setdefault(key, msg.sent) == msg.sent, "two different states at one seqno"
            self.link.append(msg)

    @precondition(lambda self: bool(self.link))
    @rule(i=st.integers(0, 1000))
    def deliver(self, i: int) -> None:
        msg = self.link.pop(i % len(self.link))
        dst = self.side(1 - msg.party)
        before = dst.core.r
        try:
            out = dst.run(dst.core.receive_state(msg))
        except StaleState:
            assert dst.core.r == before
            return
        assert all(isinstance(e, Received) and e.amount > 0 for e in out)
        self.delivered.append(msg)

    @precondition(lambda self: bool(self.delivered))
    @rule(i=st.integers(0, 1000))
    def replay(self, i: int) -> None:
        msg = self.delivered[i % len(self.delivered)]
        dst = self.side(1 - msg.party)
        before = dst.core.r
        try:
            assert dst.run(dst.core.receive_state(msg)) == []  # only the exact latest: a no-op
        except StaleState:
            pass
        assert dst.core.r == before

    @precondition(lambda self: bool(self.delivered))
    @rule(i=st.integers(0, 1000), bump=st.integers(1, 10**6))
    def forge(self, i: int, bump: int) -> None:
        msg = self.delivered[i % len(self.delivered)]
        dst = self.side(1 - msg.party)
        before = dst.core.r
        forged = attrs.evolve(msg, seqno=msg.seqno + 1000, sent=msg.sent + bump)
        with pytest.raises(ChannelError):
            dst.core.receive_state(forged)
        assert dst.core.r == before

    @rule(party=st.sampled_from([0, 1]))
    def crash_and_restart(self, party: int) -> None:
        s = self.side(party)
        before = s.core.r
        s.restart()
        assert s.core.r == before  # everything acted on was persisted

    @invariant()
    def settleable_and_conserved(self) -> None:
        for s in (self.a, self.b):
            r = s.core.r
            sent_me, sent_peer = r.own_sent, r.peer_sent
            sent_a, sent_b = (sent_me, sent_peer) if s.party == C.PARTY_A else (sent_peer, sent_me)
            bal_a, bal_b = DEP_A - sent_a + sent_b, DEP_B - sent_b + sent_a
            assert bal_a >= 0
            assert bal_b >= 0
            assert bal_a + bal_b == DEP_A + DEP_B
            assert s.core.available() >= 0
        # what a party accepted from the other never exceeds what the other signed
        assert self.b.core.r.peer_sent <= self.a.core.r.own_sent
        assert self.a.core.r.peer_sent <= self.b.core.r.own_sent

    @invariant()
    def accepted_seqno_only_grows(self) -> None:
        assert self.b.core.r.peer_seqno >= self.b_seen_seqno
        self.b_seen_seqno = self.b.core.r.peer_seqno


TestChannelMachine = ChannelMachine.TestCase
TestChannelMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_frozen_until_persisted() -> None:
    a = Channel(PARAMS, C.PARTY_A, KA)
    (p,) = a.sync_onchain(chain_data(), 0.0)
    assert isinstance(p, Persist)
    with pytest.raises(LocalProtocolError):
        a.pay(1)
    a.persisted(p.update_id)
    effects = a.pay(5)
    assert isinstance(effects[0], Persist)
    assert isinstance(effects[1], Send)
    with pytest.raises(LocalProtocolError):
        a.pay(1)
    with pytest.raises(LocalProtocolError):
        a.persisted(effects[0].update_id + 1)


def test_wrong_key_and_corrupt_record_are_refused() -> None:
    with pytest.raises(ChannelError):
        Channel(PARAMS, C.PARTY_A, KB)
    with pytest.raises(ChannelError):
        Channel.restore(PARAMS, KA, b"\x93\x01garbage")


def test_settlement_policy_threshold_timer_and_share() -> None:
    def pair(policy: SettlementPolicy) -> tuple[Side, Side]:
        a, b = Side(C.PARTY_A, KA), Side(C.PARTY_B, KB)
        b.core.policy = policy
        return a, b

    a, b = pair(SettlementPolicy(threshold=1000, interval=60, deposit_share=0.9))
    (send,) = a.run(a.core.pay(999))
    b.run(b.core.receive_state(send.msg))  # type: ignore[attr-defined]
    assert b.core.tick(10.0) == []
    (send,) = a.run(a.core.pay(1))
    b.run(b.core.receive_state(send.msg))  # type: ignore[attr-defined]
    assert b.core.tick(10.0) == [Settle("commit", "threshold")]
    assert b.core.tick(11.0) == []  # asked once until the chain moves
    b.run(b.core.sync_onchain(chain_data(seqno_a=2, sent_a=1000), 20.0))
    assert b.core.unsettled() == 0
    (send,) = a.run(a.core.pay(5))
    b.run(b.core.receive_state(send.msg))  # type: ignore[attr-defined]
    assert b.core.tick(50.0) == []
    assert b.core.tick(81.0) == [Settle("commit", "timer")]
    a, b = pair(SettlementPolicy(threshold=10**9, interval=10**9, deposit_share=0.5))
    (send,) = a.run(a.core.pay(DEP_A // 2))
    b.run(b.core.receive_state(send.msg))  # type: ignore[attr-defined]
    assert b.core.tick(1.0) == [Settle("commit", "deposit share")]
