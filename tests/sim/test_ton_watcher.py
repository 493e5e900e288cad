"""The watcher on the local chain: a stale uncooperative close is challenged, fined and finished."""

from __future__ import annotations

from ton import contract as C
from ton.channel import Channel, Persist
from ton.keys import KeyPair
from ton.localchain import LocalChain
from ton.localservice import LocalChainService
from ton.onchain import ChannelOps
from ton.session import ChannelShell
from ton.store import MemoryKVStore
from ton.wallets import Wallet
from ton.watcher import Action, Watcher, decide

TON = 10**9
KA, KB = KeyPair.from_seed(b"p" * 32), KeyPair.from_seed(b"q" * 32)


async def test_watcher_challenges_stale_close_and_finishes() -> None:
    clock = [1_800_000_000.0]
    svc = LocalChainService(LocalChain(), lambda: clock[0])
    wa, wb = Wallet(KA), Wallet(KB)
    for w in (wa, wb):
        await svc.fund(w.address(), 20 * TON, w.state_init())
    params = C.ChannelParams(
        5, KA.public, KB.public, wa.address(), wb.address(), quarantine=3600, fine=TON // 2
    )
    ops_a, ops_b = ChannelOps(svc, wa, params), ChannelOps(svc, wb, params)
    assert (await ops_a.top_up(C.PARTY_A, 4 * TON)).exit_code == 0
    a = ChannelShell(Channel(params, C.PARTY_A, KA), MemoryKVStore())
    b = ChannelShell(Channel(params, C.PARTY_B, KB), MemoryKVStore())
    watcher = Watcher(svc, ops_b, b)
    assert await watcher.check_once() is None  # open: nothing to do
    data = await svc.get_channel_state(params.address())
    assert data is not None
    await a.run(lambda: a.core.sync_onchain(data, clock[0]))
    states = [await a.pay(TON // 4) for _ in range(6)]
    for st in states:
        await b.receive(st)
    # A starts an uncooperative close with its second state (it owes 1.5 TON, claims 0.5)
    stale = states[1]
    cell = C.signed_state_cell(5, 0, stale.seqno, stale.sent, stale.signature)
    assert (await ops_a.start_uncooperative_close(KA, cell, None)).exit_code == 0
    action = await watcher.check_once()
    assert action is not None
    assert action.kind == "challenge"
    assert await watcher.check_once() is None  # challenged once; waits for the window
    clock[0] += 3600
    before = (await svc.get_account(wb.address())).last_lt
    assert await watcher.check_once() == Action("finish", "quarantine over")
    paid = [t.in_value for t in await svc.transactions(wb.address(), before) if t.in_op == C.Op.CLOSED_PAYOUT]
    assert paid == [6 * TON // 4 + TON // 2]  # what A really owed, plus the fine
    assert b.core.phase == "closed"
    assert await watcher.check_once() is None


def test_decide_ignores_own_close_and_fresh_states() -> None:
    params = C.ChannelParams(5, KA.public, KB.public, "0:" + "aa" * 32, "0:" + "bb" * 32, quarantine=100)
    b = Channel(params, C.PARTY_B, KB)
    q = C.Quarantine(seqno_a=3, sent_a=10, seqno_b=0, sent_b=0, started_at=1000, by_a=False, challenged=False)
    data = C.ChannelData(C.Status.QUARANTINE, 5, KA.public, KB.public, 100, 0, 0, 0, 0, 0, 0, 0, 100, 1, q)
    assert decide(data, b, 1050) is None  # our own close
    q2 = C.Quarantine(3, 10, 0, 0, 1000, True, False)
    data2 = C.ChannelData(C.Status.QUARANTINE, 5, KA.public, KB.public, 100, 0, 0, 0, 0, 0, 0, 0, 100, 1, q2)
    assert decide(data2, b, 1050) is None  # we hold nothing newer
    assert decide(data2, b, 1100) == Action("finish", "quarantine over")
    for e in b.sync_onchain(data2, 0.0):
        assert isinstance(e, Persist)
    assert b.phase == "dispute"


async def test_watcher_submits_a_cosigned_close_the_proposer_never_sent() -> None:
    clock = [1_800_000_000.0]
    svc = LocalChainService(LocalChain(), lambda: clock[0])
    wa, wb = Wallet(KA), Wallet(KB)
    for w in (wa, wb):
        await svc.fund(w.address(), 20 * TON, w.state_init())
    params = C.ChannelParams(6, KA.public, KB.public, wa.address(), wb.address(), quarantine=3600, fine=TON)
    ops_a, ops_b = ChannelOps(svc, wa, params), ChannelOps(svc, wb, params)
    assert (await ops_a.top_up(C.PARTY_A, 2 * TON)).exit_code == 0
    a = ChannelShell(Channel(params, C.PARTY_A, KA), MemoryKVStore())
    b = ChannelShell(Channel(params, C.PARTY_B, KB), MemoryKVStore())
    watcher = Watcher(svc, ops_b, b)
    await watcher.check_once()
    data = await svc.get_channel_state(params.address())
    assert data is not None
    await a.run(lambda: a.core.sync_onchain(data, clock[0]))
    await b.receive(await a.pay(TON // 4))
    (prop,) = await a.run(lambda: a.core.propose(close=True))
    await b.run(lambda: b.core.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    # A vanishes without submitting. B's first check gives it time; the second submits.
    assert b.core.phase == "closing"
    assert await watcher.check_once() is None
    before = (await svc.get_account(wb.address())).last_lt
    action = await watcher.check_once()
    assert action is not None
    assert action.kind == "submit_close"
    paid = [t.in_value for t in await svc.transactions(wb.address(), before) if t.in_op == C.Op.CLOSED_PAYOUT]
    assert paid == [TON // 4]
    assert b.core.phase == "closed"
