"""The channel contract on the local chain (real TVM, real signatures, mainnet config).

Deploy, top up, pay per state, commit with withdrawal, cooperative close with exact payouts,
an uncooperative close with a stale state challenged and fined, and every kind of bad input
refused both by our core and by the contract (asserting its exit codes).
"""

from __future__ import annotations

import attrs
import pytest

from overlay.errors import ChannelError, InsufficientFunds, StaleState
from ton import contract as C
from ton.channel import BadSignature, Channel, Received, Send, Submit, WrongChannel
from ton.keys import KeyPair
from ton.localchain import LocalChain
from ton.localservice import LocalChainService
from ton.messages import PayState
from ton.onchain import ChannelOps
from ton.wallets import Wallet, WalletVersion

TON = 10**9
T0 = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.t = float(T0)

    def __call__(self) -> float:
        return self.t


@attrs.define
class World:
    svc: LocalChainService
    clock: Clock
    params: C.ChannelParams
    ka: KeyPair
    kb: KeyPair
    wa: Wallet
    wb: Wallet
    ops_a: ChannelOps
    ops_b: ChannelOps
    a: Channel
    b: Channel

    async def sync(self) -> None:
        data = await self.svc.get_channel_state(self.params.address())
        assert data is not None
        for ch in (self.a, self.b):
            for eff in ch.sync_onchain(data, self.clock.t):
                if hasattr(eff, "update_id"):
                    ch.persisted(eff.update_id)


def settle_effects(ch: Channel, effects: list[object]) -> list[object]:
    out = []
    for e in effects:
        if hasattr(e, "update_id"):
            ch.persisted(e.update_id)  # type: ignore[attr-defined]
        else:
            out.append(e)
    return out


def pay(src: Channel, dst: Channel, amount: int) -> PayState:
    (send,) = settle_effects(src, src.pay(amount))
    assert isinstance(send, Send)
    st = send.msg
    assert isinstance(st, PayState)
    got = settle_effects(dst, dst.receive_state(st))
    assert got == [Received(amount)]
    return st


@pytest.fixture
async def world() -> World:
    clock = Clock()
    svc = LocalChainService(LocalChain(), clock)
    ka, kb = KeyPair.from_seed(b"A" * 32), KeyPair.from_seed(b"B" * 32)
    wa, wb = Wallet(ka, WalletVersion.V5R1), Wallet(kb, WalletVersion.V4R2)
    for w in (wa, wb):
        await svc.fund(w.address(), 100 * TON, w.state_init())
    params = C.ChannelParams(
        channel_id=0xC0C0, key_a=ka.public, key_b=kb.public, addr_a=wa.address(), addr_b=wb.address(),
        quarantine=3600, fine=TON // 10,
    )  # fmt: skip
    w = World(
        svc, clock, params, ka, kb, wa, wb,
        ChannelOps(svc, wa, params), ChannelOps(svc, wb, params),
        Channel(params, C.PARTY_A, ka), Channel(params, C.PARTY_B, kb),
    )  # fmt: skip
    tx = await w.ops_a.top_up(C.PARTY_A, 5 * TON)
    assert (tx.exit_code, tx.success) == (0, True)
    await w.sync()
    return w


async def test_deploy_top_up_while_open_and_pay(world: World) -> None:
    w = world
    tx = await w.ops_b.top_up(C.PARTY_B, 1 * TON)
    assert tx.exit_code == 0
    await w.sync()
    data = await w.ops_a.data()
    assert data is not None
    assert (data.deposit_a, data.deposit_b, data.status) == (5 * TON, 1 * TON, C.Status.OPEN)
    for _ in range(10):
        pay(w.a, w.b, TON // 10)
    pay(w.b, w.a, TON // 20)
    assert w.a.available() == 5 * TON - TON + TON // 20
    assert w.b.available() == 1 * TON + TON - TON // 20
    # a top-up with too little value for its gas reserve is refused by the contract
    bad = await w.ops_a._via_wallet(C.top_up_body(C.PARTY_A, TON), TON)
    assert bad.exit_code == C.ExitCode.NOT_ENOUGH_VALUE


async def test_commit_withdraws_then_cooperative_close_pays_exactly(world: World) -> None:
    w = world
    for _ in range(7):
        pay(w.a, w.b, 100_000_000)
    # B proposes a commit that withdraws its earned 0.7 TON while the channel stays open.
    (prop,) = settle_effects(w.b, w.b.propose(close=False))
    (sig,) = settle_effects(w.a, w.a.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    (submit,) = w.b.receive_signature(sig.msg)  # type: ignore[attr-defined]
    assert isinstance(submit, Submit)
    before = (await w.svc.get_account(w.wb.address())).last_lt
    tx = await w.ops_b.submit(submit.body)
    assert (tx.exit_code, tx.success) == (0, True)
    paid = await w.svc.transactions(w.wb.address(), before)
    assert [t.in_value for t in paid if t.in_op == C.Op.WITHDRAWN] == [700_000_000]
    await w.sync()
    assert w.b.available() == 0
    assert w.b.unsettled() == 0
    # The channel keeps working after the commit; then a cooperative close pays exact amounts.
    pay(w.a, w.b, 250_000_000)
    (prop,) = settle_effects(w.a, w.a.propose(close=True))
    (sig,) = settle_effects(w.b, w.b.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    (submit,) = w.a.receive_signature(sig.msg)  # type: ignore[attr-defined]
    with pytest.raises(ChannelError):
        w.a.pay(1)  # closing: no more payments
    before_b = (await w.svc.get_account(w.wb.address())).last_lt
    before_a = (await w.svc.get_account(w.wa.address())).last_lt
    tx = await w.ops_a.submit(submit.body)
    assert (tx.exit_code, tx.success) == (0, True)
    to_b = [
        t.in_value
        for t in await w.svc.transactions(w.wb.address(), before_b)
        if t.in_op == C.Op.CLOSED_PAYOUT
    ]
    to_a = [
        t.in_value
        for t in await w.svc.transactions(w.wa.address(), before_a)
        if t.in_op == C.Op.CLOSED_PAYOUT
    ]
    assert to_b == [250_000_000]
    # A gets its balance plus what is left of the gas reserve, minus the gas of the externals.
    assert len(to_a) == 1
    assert 5 * TON - 950_000_000 - 20_000_000 < to_a[0] <= 5 * TON - 950_000_000 + 10_000_000
    data = await w.ops_a.data()
    assert data is not None
    assert data.status is C.Status.CLOSED
    # a replay of the close, or any top-up, is refused forever
    again = await w.ops_a.submit(submit.body, via_wallet=True)
    assert again.exit_code == C.ExitCode.WRONG_STATUS
    late = await w.ops_a.top_up(C.PARTY_A, TON)
    assert late.exit_code == C.ExitCode.WRONG_STATUS


async def test_stale_uncooperative_close_is_challenged_and_fined(world: World) -> None:
    w = world
    stale_a = None
    for i in range(5):
        st = pay(w.a, w.b, 200_000_000)
        if i == 0:
            stale_a = st
    assert stale_a is not None
    # A cheats: starts an uncooperative close with its first (stale) state.
    stale_cell = C.signed_state_cell(w.params.channel_id, 0, stale_a.seqno, stale_a.sent, stale_a.signature)
    tx = await w.ops_a.start_uncooperative_close(w.ka, stale_cell, None)
    assert (tx.exit_code, tx.success) == (0, True)
    data = await w.ops_b.data()
    assert data is not None
    assert data.status is C.Status.QUARANTINE
    assert data.quarantine is not None
    assert data.quarantine.sent_a == 200_000_000
    # finishing before the quarantine is over is refused
    early = await w.ops_b.finish(via_wallet=True)
    assert early.exit_code == C.ExitCode.TOO_EARLY
    # A may not challenge its own close
    own = await w.ops_a.challenge(w.ka, *w.a.signed_state_cells())
    assert own.exit_code == C.ExitCode.NOT_ALLOWED
    # B challenges with A's latest state
    tx = await w.ops_b.challenge(w.kb, *w.b.signed_state_cells())
    assert (tx.exit_code, tx.success) == (0, True)
    again = await w.ops_b.challenge(w.kb, *w.b.signed_state_cells())
    assert again.exit_code == C.ExitCode.ALREADY_CHALLENGED
    w.clock.t += 3601
    before_b = (await w.svc.get_account(w.wb.address())).last_lt
    tx = await w.ops_b.finish()
    assert (tx.exit_code, tx.success) == (0, True)
    to_b = [
        t.in_value
        for t in await w.svc.transactions(w.wb.address(), before_b)
        if t.in_op == C.Op.CLOSED_PAYOUT
    ]
    assert to_b == [1 * TON + TON // 10]  # everything A sent, plus the fine
    data = await w.ops_b.data()
    assert data is not None
    assert data.status is C.Status.CLOSED


async def test_challenge_after_quarantine_is_too_late(world: World) -> None:
    w = world
    pay(w.a, w.b, 100_000_000)
    st = pay(w.a, w.b, 100_000_000)
    tx = await w.ops_b.start_uncooperative_close(w.kb, *w.b.signed_state_cells())
    assert tx.exit_code == 0
    w.clock.t += 3600
    late = await w.ops_a.challenge(
        w.ka, C.signed_state_cell(w.params.channel_id, 0, st.seqno, st.sent, st.signature), None
    )
    assert late.exit_code == C.ExitCode.TOO_LATE


async def test_bad_states_are_refused_by_core_and_contract(world: World) -> None:
    w = world
    cid = w.params.channel_id
    good = pay(w.a, w.b, 300_000_000)
    # 1. bad signature
    forged = attrs.evolve(good, seqno=good.seqno + 1, sent=good.sent + 1)
    with pytest.raises(BadSignature):
        w.b.receive_state(forged)
    cell = C.signed_state_cell(cid, 0, forged.seqno, forged.sent, forged.signature)
    tx = await w.ops_b.start_uncooperative_close(w.kb, cell, None)
    assert tx.exit_code == C.ExitCode.BAD_SIGNATURE_A
    # 2. wrong channel id (validly signed by A, for another channel)
    other = w.ka.sign(C.state_hash(cid + 1, 0, 9, 1))
    with pytest.raises(WrongChannel):
        w.b.receive_state(PayState((cid + 1).to_bytes(16, "big"), 0, 9, 1, other))
    tx = await w.ops_b.start_uncooperative_close(w.kb, C.signed_state_cell(cid + 1, 0, 9, 1, other), None)
    assert tx.exit_code == C.ExitCode.WRONG_CHANNEL
    # 3. amount above the deposit (validly signed by A)
    seq = good.seqno + 1
    too_much = w.ka.sign(C.state_hash(cid, 0, seq, 6 * TON))
    with pytest.raises(InsufficientFunds):
        w.b.receive_state(PayState(w.b.cid, 0, seq, 6 * TON, too_much))
    tx = await w.ops_b.start_uncooperative_close(
        w.kb, C.signed_state_cell(cid, 0, seq, 6 * TON, too_much), None
    )
    assert tx.exit_code == C.ExitCode.OVERDRAFT
    # 4. old seqno: a replayed state below the committed one
    (prop,) = settle_effects(w.b, w.b.propose(close=False))
    (sig,) = settle_effects(w.a, w.a.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    (submit,) = w.b.receive_signature(sig.msg)  # type: ignore[attr-defined]
    assert (await w.ops_b.submit(submit.body)).exit_code == 0
    await w.sync()
    newer = pay(w.a, w.b, 1)
    with pytest.raises(StaleState):
        w.b.receive_state(good)
    old_cell = C.signed_state_cell(
        cid, 0, good.seqno - 1, good.sent - 1, w.ka.sign(C.state_hash(cid, 0, good.seqno - 1, good.sent - 1))
    )
    tx = await w.ops_a.start_uncooperative_close(w.ka, old_cell, None)
    assert tx.exit_code == C.ExitCode.OLD_SEQNO
    # a replayed cooperative commit is refused too
    tx = await w.ops_b.submit(submit.body, via_wallet=True)
    assert tx.exit_code == C.ExitCode.OLD_SEQNO or tx.exit_code == C.ExitCode.NOTHING_NEW
    # a cooperative close with a forged B signature
    close = C.coop_close_body(
        cid,
        newer.seqno,
        0,
        newer.sent,
        0,
        w.ka.sign(C.close_payload_hash(cid, newer.seqno, 0, newer.sent, 0)),
        b"\x00" * 64,
    )
    tx = await w.ops_a.submit(close, via_wallet=True)
    assert tx.exit_code == C.ExitCode.BAD_SIGNATURE_B
    # an unknown op bounces
    from pytoniq_core.boc.builder import Builder

    tx = await w.ops_a._via_wallet(Builder().store_uint(0x12345678, 32).end_cell(), C.TOP_UP_GAS_RESERVE)
    assert tx.exit_code == C.ExitCode.UNKNOWN_OP
    data = await w.ops_a.data()
    assert data is not None
    assert data.status is C.Status.OPEN
    assert data.deposit_a == 5 * TON


async def test_cooperative_close_of_an_unused_channel_returns_the_deposit(world: World) -> None:
    """Nothing was ever paid: the proposer signs a zero-amount state at seqno 1 so the contract
    (which wants a newer seqno) accepts the close; the payee gets nothing, the payer all."""
    w = world
    (prop,) = settle_effects(w.a, w.a.propose(close=True))
    (sig,) = settle_effects(w.b, w.b.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    (submit,) = w.a.receive_signature(sig.msg)  # type: ignore[attr-defined]
    before = (await w.svc.get_account(w.wa.address())).last_lt
    tx = await w.ops_a.submit(submit.body)
    assert (tx.exit_code, tx.success) == (0, True)
    back = [
        t.in_value for t in await w.svc.transactions(w.wa.address(), before) if t.in_op == C.Op.CLOSED_PAYOUT
    ]
    assert len(back) == 1
    assert 5 * TON - 10_000_000 < back[0] <= 5 * TON + C.TOP_UP_GAS_RESERVE
    await w.sync()
    assert w.a.phase == w.b.phase == "closed"
