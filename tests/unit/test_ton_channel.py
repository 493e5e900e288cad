"""The channel core: Hypothesis state machine (conservation, no replay, always settleable,
crash at any point), plus persistence discipline and bad input."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from overlay.errors import ChannelError, InsufficientFunds, LocalProtocolError, StaleState
from ton import contract as C
from ton.channel import (
    BadSignature,
    Channel,
    Persist,
    Received,
    Send,
    Settle,
    SettlementPolicy,
    Submit,
    WrongChannel,
)
from ton.keys import KeyPair
from ton.messages import CommitProposal, PayState
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


def _signed_proposal(signer: KeyPair, **kw: int | bool) -> CommitProposal:
    p = CommitProposal(PARAMS.channel_id.to_bytes(16, "big"), 0, 0, 0, 0, 0, 0, False, b"")
    p = attrs.evolve(p, **kw)
    h = (
        C.close_payload_hash(PARAMS.channel_id, p.seqno_a, p.seqno_b, p.sent_a, p.sent_b)
        if p.close
        else C.commit_payload_hash(
            PARAMS.channel_id, p.seqno_a, p.seqno_b, p.sent_a, p.sent_b, p.withdraw_a, p.withdraw_b
        )
    )
    return attrs.evolve(p, signature=signer.sign(h))


@given(
    payments=st.lists(st.integers(1, 50_000), min_size=1, max_size=8),
    delivered=st.integers(0, 8),
    proposal=st.tuples(
        st.integers(0, 10), st.integers(0, 3), st.integers(0, 400_000), st.integers(0, 1000),
        st.integers(0, 400_000), st.integers(0, 400_000), st.booleans(),
    ),
    cosigner=st.sampled_from([C.PARTY_A, C.PARTY_B]),
)  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_a_cosigned_proposal_never_takes_value_from_the_cosigner(
    payments: list[int], delivered: int, proposal: tuple[int, int, int, int, int, int, bool], cosigner: int
) -> None:
    """A pays B; B has seen only some states (others in flight). Whatever the proposer signs, if
    the co-signer signs it too, the co-signer ends with at least the value its own view gives it,
    and the contract could settle it (no balance below zero)."""
    a, b = Side(C.PARTY_A, KA), Side(C.PARTY_B, KB)
    states = []
    for amount in payments:
        (send,) = a.run(a.core.pay(amount))
        states.append(send.msg)  # type: ignore[attr-defined]
    for st_ in states[: min(delivered, len(states))]:
        b.run(b.core.receive_state(st_))
    me, proposer_key = (a, KB) if cosigner == C.PARTY_A else (b, KA)
    sa, sb, xa, xb, wa, wb, close = proposal
    p = _signed_proposal(
        proposer_key, seqno_a=sa, seqno_b=sb, sent_a=xa, sent_b=xb, withdraw_a=wa, withdraw_b=wb, close=close
    )

    def value(sent_a: int, sent_b: int) -> int:  # what the co-signer owns, withdrawn or not
        return DEP_A - sent_a + sent_b if cosigner == C.PARTY_A else DEP_B - sent_b + sent_a

    r = me.core.r
    latest_a, latest_b = (r.own_sent, r.peer_sent) if cosigner == C.PARTY_A else (r.peer_sent, r.own_sent)
    try:
        out = me.run(me.core.receive_proposal(p))
    except ChannelError:
        return
    assert len(out) == 1
    assert value(xa, xb) >= value(latest_a, latest_b)
    wd_a, wd_b = (0, 0) if close else (wa, wb)
    assert DEP_A - wd_a - xa + xb >= 0
    assert DEP_B - wd_b - xb + xa >= 0


def test_in_flight_payments_do_not_block_a_commit() -> None:
    """B proposes from the states it has; A already signed more (in flight): A still co-signs."""
    a, b = Side(C.PARTY_A, KA), Side(C.PARTY_B, KB)
    first = a.run(a.core.pay(100))[0]
    a.run(a.core.pay(50))  # not delivered yet
    b.run(b.core.receive_state(first.msg))  # type: ignore[attr-defined]
    (prop,) = b.run(b.core.propose(close=False))
    (sig,) = a.run(a.core.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    (submit,) = b.run(b.core.receive_signature(sig.msg))  # type: ignore[attr-defined]
    assert isinstance(submit, Submit)
    # but A refuses a proposal recording less than A holds from B, or more than A sent
    (bs,) = b.run(b.core.pay(10))
    a.run(a.core.receive_state(bs.msg))  # type: ignore[attr-defined]
    with pytest.raises(StaleState):
        a.core.receive_proposal(_signed_proposal(KB, seqno_a=1, seqno_b=0, sent_a=100, withdraw_b=100))
    with pytest.raises(StaleState):
        a.core.receive_proposal(_signed_proposal(KB, seqno_a=3, seqno_b=1, sent_a=150, sent_b=10))


def test_late_earlier_states_are_checked_but_change_nothing() -> None:
    a, b = Side(C.PARTY_A, KA), Side(C.PARTY_B, KB)
    s1 = a.run(a.core.pay(10))[0].msg  # type: ignore[attr-defined]
    s2 = a.run(a.core.pay(20))[0].msg  # type: ignore[attr-defined]
    b.run(b.core.receive_state(s2))
    before = b.core.r
    b.core.check_old_state(s1)
    assert b.core.r == before
    with pytest.raises(BadSignature):
        b.core.check_old_state(attrs.evolve(s1, sent=11))
    with pytest.raises(StaleState):
        b.core.check_old_state(s2)  # not earlier
    with pytest.raises(WrongChannel):
        b.core.check_old_state(attrs.evolve(s1, party=C.PARTY_B))


def test_idle_channels_close_and_unused_ones_can_close() -> None:
    a, b = Side(C.PARTY_A, KA), Side(C.PARTY_B, KB)
    a.core.policy = SettlementPolicy(close_idle=100.0)
    a.run(a.core.sync_onchain(chain_data(), 1000.0))
    assert a.core.r.last_activity == 1000.0
    assert a.core.tick(1050.0) == []
    a.core.note_activity(1060.0)
    assert a.core.tick(1150.0) == []
    assert a.core.tick(1160.0) == [Settle("close", "idle")]
    assert a.core.tick(1161.0) == []  # once, until the chain moves or the shell gives up
    a.core.settle_failed()
    # nothing was ever paid: the close still carries a newer seqno (the contract requires one)
    (prop,) = a.run(a.core.propose(close=True))
    p = prop.msg  # type: ignore[attr-defined]
    assert (p.seqno_a, p.sent_a, p.seqno_b) == (1, 0, 0)
    (sig,) = b.run(b.core.receive_proposal(p))
    (submit,) = a.run(a.core.receive_signature(sig.msg))  # type: ignore[attr-defined]
    assert isinstance(submit, Submit)
    assert submit.kind == "close"
