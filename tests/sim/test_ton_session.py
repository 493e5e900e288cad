"""Metered sessions over in-memory MessageStreams (direct and through a proxy), the credit
window, and a crash in the middle of a payment update followed by a settlement on the local chain."""

from __future__ import annotations

import random
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from overlay.errors import ChannelError, InsufficientFunds, StoreError
from overlay.streams import FramedStream, memory_stream_pair
from ton import contract as C
from ton.channel import BadSignature, Channel, Persist, Send, Submit
from ton.keys import KeyPair
from ton.localchain import LocalChain
from ton.localservice import LocalChainService
from ton.messages import PayState, SessionOpen, SessionPayment
from ton.metering import MeterConfig, MeteringError, PayFor, Prices
from ton.onchain import ChannelOps
from ton.session import ChannelShell, PayerSession, SessionAborted, WorkerSession, _Queued, forward_session
from ton.store import MemoryKVStore, SQLiteKVStore
from ton.wallets import Wallet

TON = 10**9
KC, KP, KW = (KeyPair.from_seed(bytes([i]) * 32) for i in (1, 2, 3))


def params(cid: int, a: KeyPair, b: KeyPair) -> C.ChannelParams:
    return C.ChannelParams(cid, a.public, b.public, Wallet(a).address(), Wallet(b).address(), quarantine=60)


def funded(cid: int, a: KeyPair, b: KeyPair, deposit: int = TON) -> tuple[ChannelShell, ChannelShell]:
    p = params(cid, a, b)
    data = C.ChannelData(C.Status.OPEN, cid, a.public, b.public, deposit, 0, 0, 0, 0, 0, 0, 0, 60, 1)
    shells = []
    for party, key in ((C.PARTY_A, a), (C.PARTY_B, b)):
        core = Channel(p, party, key)
        for e in core.sync_onchain(data, 0.0):
            assert isinstance(e, Persist)
            core.persisted(e.update_id)
        shells.append(ChannelShell(core, MemoryKVStore()))
    return shells[0], shells[1]


def framed_pair() -> tuple[FramedStream, FramedStream]:
    a, b = memory_stream_pair()
    return FramedStream(a, peer_id="x"), FramedStream(b, peer_id="y")


def open_msg(cid: int, prices: Prices, prompt: int = 20) -> SessionOpen:
    return SessionOpen(
        b"sess" * 4, b"offer", cid.to_bytes(16, "big"), prices.prompt, prices.completion, prompt, 512
    )


async def run_worker(ws: WorkerSession, tokens: trio.MemorySendChannel[list[int]], total: int) -> None:
    await ws.accept()
    async with trio.open_nursery() as n:
        await n.start(ws.run_payments)
        async with tokens:
            for i in range(0, total, 4):
                chunk = list(range(i, min(i + 4, total)))
                await ws.produced(chunk)
                await tokens.send(chunk)
        await ws.finish()


async def run_client(ps: PayerSession, tokens: trio.MemoryReceiveChannel[list[int]]) -> None:
    await ps.start()
    async with trio.open_nursery() as n:
        await n.start(ps.run_receipts)
        async for chunk in tokens:
            await ps.received(chunk)
        await ps.close()


async def test_direct_session_pays_every_token_exactly() -> None:
    prices = Prices(10, 1000)
    client_ch, worker_ch = funded(1, KC, KW)
    cs, wsx = framed_pair()
    ps = PayerSession(cs, client_ch, open_msg(1, prices), KW.public)
    ws = WorkerSession(wsx, worker_ch, KW)
    send, recv = trio.open_memory_channel[list[int]](0)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(run_worker, ws, send, 300)
            n.start_soon(run_client, ps, recv)
    due = prices.cost(20, 300)
    assert client_ch.core.r.own_sent == due
    assert worker_ch.core.r.peer_sent == due
    assert ws.meter is not None
    assert ws.meter.paid_tokens == 300
    assert [r.tokens for r in ps.receipts] == [128, 256, 300]
    assert ps.receipts[-1].final


async def test_hub_session_forwards_payment_and_keeps_fee() -> None:
    client_prices, worker_prices = Prices(11, 1100), Prices(10, 1000)
    cp_client, cp_proxy = funded(2, KC, KP)
    pw_proxy, pw_worker = funded(3, KP, KW)
    c_side, p_client_side = framed_pair()
    p_worker_side, w_side = framed_pair()
    ps = PayerSession(c_side, cp_client, open_msg(2, client_prices), KW.public)
    ws = WorkerSession(w_side, pw_worker, KW, forwarded=True)
    send, recv = trio.open_memory_channel[list[int]](0)
    result = {}

    async def proxy() -> None:
        result["fwd"] = await forward_session(p_client_side, p_worker_side, cp_proxy, pw_proxy, worker_prices)

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(proxy)
            n.start_soon(run_worker, ws, send, 200)
            n.start_soon(run_client, ps, recv)
    assert cp_proxy.core.r.peer_sent == client_prices.cost(20, 200)
    assert pw_worker.core.r.peer_sent == worker_prices.cost(20, 200)
    assert result["fwd"].fee == client_prices.cost(20, 200) - worker_prices.cost(20, 200)


async def test_worker_pauses_and_aborts_when_client_stops_paying() -> None:
    prices = Prices(0, 1000)
    client_ch, worker_ch = funded(4, KC, KW)
    cs, wsx = framed_pair()
    cfg = MeterConfig(credit_window=128, pause_timeout=0.3)
    ps = PayerSession(cs, client_ch, open_msg(4, prices), KW.public)
    ws = WorkerSession(wsx, worker_ch, KW, cfg)
    send, recv = trio.open_memory_channel[list[int]](1000)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(ps.start)
            await ws.accept()
            await n.start(ws.run_payments)
            aborted = None
            for i in range(100):
                try:
                    await ws.produced([i, i])
                except SessionAborted as e:
                    aborted = e
                    break
                await send.send([i, i])  # the client reads nothing and pays nothing
            assert aborted is not None
            n.cancel_scope.cancel()
    assert ws.meter is not None
    assert ws.meter.sent == 128
    assert recv.statistics().current_buffer_used == 64


async def test_crash_mid_payment_update_then_settle_on_chain(tmp_path: Path) -> None:
    """Crash before the persist completes and after it (before sending): after restarts the
    payee settles exactly what it accepted, on the real contract."""
    clock = [1_800_000_000.0]
    svc = LocalChainService(LocalChain(), lambda: clock[0])
    wc, ww = Wallet(KC), Wallet(KW)
    for w in (wc, ww):
        await svc.fund(w.address(), 50 * TON, w.state_init())
    p = params(9, KC, KW)
    ops_c, ops_w = ChannelOps(svc, wc, p), ChannelOps(svc, ww, p)
    assert (await ops_c.top_up(C.PARTY_A, 2 * TON)).exit_code == 0
    data = await svc.get_channel_state(p.address())
    assert data is not None

    def shell(party: int, key: KeyPair, path: Path) -> ChannelShell:
        store = SQLiteKVStore(path)
        blob = store.read("channel", (9).to_bytes(16, "big").hex())
        core = Channel.restore(p, key, blob) if blob else Channel(p, party, key)
        return ChannelShell(core, store)

    async def sync(sh: ChannelShell) -> None:
        d = await svc.get_channel_state(p.address())
        assert d is not None
        await sh.run(lambda: sh.core.sync_onchain(d, clock[0]))

    client = shell(C.PARTY_A, KC, tmp_path / "c.sqlite")
    worker = shell(C.PARTY_B, KW, tmp_path / "w.sqlite")
    await sync(client)
    await sync(worker)
    for _ in range(3):
        await worker.receive(await client.pay(10_000_000))

    # crash 1: the disk write fails -> the signed state was never durable, never sent
    class Failing(SQLiteKVStore):
        def write(self, namespace: str, key: str, value: bytes) -> None:
            raise OSError("disk gone")

    client.store.close()  # type: ignore[attr-defined]
    crashing = ChannelShell(client.core, Failing(tmp_path / "c.sqlite"))
    with pytest.raises(StoreError, match="disk gone"):
        await crashing.pay(10_000_000)
    assert crashing.core.r.own_sent == 30_000_000  # reloaded from the last durable record
    crashing.store.close()  # type: ignore[attr-defined]
    client = shell(C.PARTY_A, KC, tmp_path / "c.sqlite")
    # crash 2: persisted, then the process dies before sending
    st = await client.pay(20_000_000)
    client.store.close()  # type: ignore[attr-defined]
    client = shell(C.PARTY_A, KC, tmp_path / "c.sqlite")
    (resend,) = client.core.resend()
    assert isinstance(resend, Send)
    assert resend.msg == st  # the same state, not a new one at the same seqno
    assert isinstance(resend.msg, PayState)
    await worker.receive(resend.msg)
    await worker.receive(resend.msg)  # a duplicate after reconnect is a no-op
    # the worker restarts too; nothing it accepted is lost
    worker.store.close()  # type: ignore[attr-defined]
    worker = shell(C.PARTY_B, KW, tmp_path / "w.sqlite")
    assert worker.core.r.peer_sent == 50_000_000
    # cooperative close on the real contract pays the worker exactly that
    (prop,) = await client.run(lambda: client.core.propose(close=True))
    (sig,) = await worker.run(lambda: worker.core.receive_proposal(prop.msg))  # type: ignore[attr-defined]
    (submit,) = client.core.receive_signature(sig.msg)  # type: ignore[attr-defined]
    assert isinstance(submit, Submit)
    before = (await svc.get_account(ww.address())).last_lt
    tx = await ops_w.submit(submit.body)
    assert (tx.exit_code, tx.success) == (0, True)
    paid = [t.in_value for t in await svc.transactions(ww.address(), before) if t.in_op == C.Op.CLOSED_PAYOUT]
    assert paid == [50_000_000]


async def test_payments_of_concurrent_sessions_may_arrive_out_of_order() -> None:
    """Two sessions share a channel: state n+1 (session 2) may reach the payee before state n
    (session 1). Each session is credited exactly; nothing is credited twice or from nowhere."""
    client_ch, worker_ch = funded(6, KC, KW)
    s1 = await client_ch.pay(1000)
    s2 = await client_ch.pay(2000)
    assert await worker_ch.receive_payment(s2) == 3000  # both increases are in the pool now
    worker_ch.claim(2000)
    assert await worker_ch.receive_payment(s1) == 0  # late and earlier: checked, adds nothing
    worker_ch.claim(1000)
    with pytest.raises(MeteringError):
        worker_ch.claim(1)
    with pytest.raises(BadSignature):
        await worker_ch.receive_payment(attrs.evolve(s1, sent=999))
    assert worker_ch.core.r.peer_sent == 3000


class Shuffled:
    """A MessageStream that delays each sent message by a seeded random few milliseconds."""

    def __init__(self, inner: FramedStream, rng: random.Random) -> None:
        self.inner, self.rng, self.peer_id = inner, rng, inner.peer_id

    async def send(self, msg: object) -> None:
        await trio.sleep(self.rng.random() * 0.01)
        await self.inner.send(msg)

    async def receive(self) -> object | None:
        return await self.inner.receive()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def reset(self) -> None:
        await self.inner.reset()


async def test_concurrent_sessions_on_one_channel_are_each_paid_exactly() -> None:
    prices = Prices(3, 1000)
    client_ch, worker_ch = funded(7, KC, KW)
    rng = random.Random(7)
    results = []
    async with trio.open_nursery() as n:
        for k in range(4):
            cs, wsx = framed_pair()
            sid = bytes([k]) * 16
            om = SessionOpen(
                sid, b"offer", (7).to_bytes(16, "big"), prices.prompt, prices.completion, 20, 512
            )
            ps = PayerSession(Shuffled(cs, rng), client_ch, om, KW.public)
            ws = WorkerSession(wsx, worker_ch, KW)
            send, recv = trio.open_memory_channel[list[int]](0)
            results.append((ps, ws))
            n.start_soon(run_worker, ws, send, 100 + 37 * k)
            n.start_soon(run_client, ps, recv)
    total = sum(prices.cost(20, 100 + 37 * k) for k in range(4))
    assert client_ch.core.r.own_sent == worker_ch.core.r.peer_sent == total
    assert worker_ch.pool == 0
    for k, (_, ws) in enumerate(results):
        assert ws.meter is not None
        assert ws.meter.paid_amount == prices.cost(20, 100 + 37 * k)


async def test_payments_within_the_window_share_one_signed_state(autojump_clock: MockClock) -> None:
    client_ch, worker_ch = funded(11, KC, KW)
    seqno = client_ch.core.r.own_seqno
    states: list[PayState] = []

    async def pay(amount: int) -> None:
        states.append(await client_ch.pay_shared(amount, 0.05))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for amount in (1000, 2000, 3000):
                n.start_soon(pay, amount)
    assert len(states) == 3
    assert states[0] == states[1] == states[2]
    assert client_ch.core.r.own_seqno == seqno + 1
    assert client_ch.core.r.own_sent == 6000
    # the payee checks the shared state once; each session claims its own part of it
    assert await worker_ch.receive_payment(states[0]) == 6000
    assert await worker_ch.receive_payment(states[1]) == 0
    assert await worker_ch.receive_payment(states[2]) == 0
    for amount in (1000, 2000, 3000):
        worker_ch.claim(amount)
    assert worker_ch.pool == 0
    with pytest.raises(MeteringError):
        worker_ch.claim(1)


async def test_a_payment_cancelled_in_the_window_takes_its_amount_back(autojump_clock: MockClock) -> None:
    client_ch, _ = funded(12, KC, KW)
    got: list[PayState] = []

    async def pay(amount: int) -> None:
        got.append(await client_ch.pay_shared(amount, 0.05))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(pay, 1000)
            with trio.CancelScope() as cancelled:
                n.start_soon(lambda: _cancel_soon(cancelled))
                await client_ch.pay_shared(5000, 0.05)
    assert cancelled.cancelled_caught
    (st,) = got
    assert st.sent == client_ch.core.r.own_sent == 1000  # the cancelled 5000 was never signed


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.sleep(0.01)
    scope.cancel()


async def test_a_failed_shared_payment_fails_every_member_and_signs_nothing(
    autojump_clock: MockClock,
) -> None:
    client_ch, _ = funded(13, KC, KW, deposit=10_000)
    seqno = client_ch.core.r.own_seqno
    errors: list[Exception] = []

    async def pay(amount: int) -> None:
        try:
            await client_ch.pay_shared(amount, 0.05)
        except ChannelError as e:
            errors.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(pay, 6000)
            n.start_soon(pay, 6000)  # together more than the deposit
    assert len(errors) == 2
    assert any(isinstance(e, InsufficientFunds) for e in errors)
    assert client_ch.core.r.own_seqno == seqno
    assert client_ch.core.r.own_sent == 0


async def test_paced_sessions_coalesce_their_payments_and_are_paid_exactly(autojump_clock: MockClock) -> None:
    """Six sessions at 50 tokens/s for 3 s (virtual time) on one channel: the time rule fires on
    a shared grid, so a handful of states carries every session's payments; each is exact."""
    prices = Prices(3, 1000)
    client_ch, worker_ch = funded(14, KC, KW)
    sessions: list[tuple[PayerSession, WorkerSession, int]] = []
    payments = [0]

    class Counting(FramedStream):
        async def send(self, msg: object) -> None:
            if isinstance(msg, SessionPayment):
                payments[0] += 1
            await super().send(msg)

    async def paced_worker(ws: WorkerSession, out: trio.MemorySendChannel[list[int]], k: int) -> None:
        await ws.accept()
        async with trio.open_nursery() as n:
            await n.start(ws.run_payments)
            async with out:
                await trio.sleep(k / 300)  # staggered starts
                for i in range(150):
                    await ws.produced([i])
                    await out.send([i])
                    await trio.sleep(0.02)
            await ws.finish()

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for k in range(6):
                x, y = memory_stream_pair()
                sid = bytes([k + 1]) * 16
                cid = (14).to_bytes(16, "big")
                om = SessionOpen(sid, b"o", cid, prices.prompt, prices.completion, 20, 512)
                ps = PayerSession(Counting(x, peer_id="w"), client_ch, om, KW.public)
                ws = WorkerSession(FramedStream(y, peer_id="c"), worker_ch, KW)
                send, recv = trio.open_memory_channel[list[int]](0)
                sessions.append((ps, ws, k))
                n.start_soon(paced_worker, ws, send, k)
                n.start_soon(run_client, ps, recv)
    total = 6 * prices.cost(20, 150)
    assert client_ch.core.r.own_sent == worker_ch.core.r.peer_sent == total
    assert worker_ch.pool == 0
    for _, ws, _k in sessions:
        assert ws.meter is not None
        assert ws.meter.paid_amount == prices.cost(20, 150)
    states = client_ch.core.r.own_seqno
    # 6 prepaid prompts and 6 closes sign their own states; the 3 s of streaming add about 6
    assert payments[0] >= 6 * 7, payments[0]
    assert states <= 6 + 6 + 8, states


async def test_a_proxy_forwards_concurrent_sessions_in_shared_states(autojump_clock: MockClock) -> None:
    """Four clients (each on its own channel to the proxy) stream from one worker through the
    proxy: the proxy's payments to the worker share states; every party ends exactly paid."""
    client_prices, worker_prices = Prices(11, 1100), Prices(10, 1000)
    pw_proxy, pw_worker = funded(20, KP, KW)
    fees = []
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for k in range(4):
                cp_client, cp_proxy = funded(21 + k, KC, KP)
                c_side, p_client_side = framed_pair()
                p_worker_side, w_side = framed_pair()
                om = attrs.evolve(open_msg(21 + k, client_prices), session_id=bytes([k + 1]) * 16)
                ps = PayerSession(c_side, cp_client, om, KW.public)
                ws = WorkerSession(w_side, pw_worker, KW, forwarded=True)
                send, recv = trio.open_memory_channel[list[int]](0)

                async def proxy(a: FramedStream, b: FramedStream, cp: ChannelShell) -> None:
                    fwd = await forward_session(a, b, cp, pw_proxy, worker_prices, window=0.05)
                    fees.append(fwd.fee)

                n.start_soon(proxy, p_client_side, p_worker_side, cp_proxy)
                n.start_soon(_paced, ws, send, 100)
                n.start_soon(run_client, ps, recv)
    assert pw_worker.core.r.peer_sent == pw_proxy.core.r.own_sent == 4 * worker_prices.cost(20, 100)
    assert pw_worker.pool == 0
    assert sum(fees) == 4 * (client_prices.cost(20, 100) - worker_prices.cost(20, 100))
    # 4 prompts forwarded at once; the rest (about 4 x 4 payments) in a few shared states
    assert pw_proxy.core.r.own_seqno <= 4 + 8


async def _paced(ws: WorkerSession, out: trio.MemorySendChannel[list[int]], total: int) -> None:
    await ws.accept()
    async with trio.open_nursery() as n:
        await n.start(ws.run_payments)
        async with out:
            for i in range(total):
                await ws.produced([i])
                await out.send([i])
                await trio.sleep(0.02)
        await ws.finish()


class _GatedWriter:
    """A durable writer that holds every write until the test opens the gate."""

    def __init__(self, store: MemoryKVStore) -> None:
        self.store = store
        self.gate = trio.Event()
        self.entered = trio.Event()
        self.writer_task: object = None

    async def write(self, namespace: str, key: str, value: bytes) -> None:
        self.writer_task = trio.lowlevel.current_task()
        self.entered.set()
        await self.gate.wait()
        self.store.write(namespace, key, value)


async def test_a_payment_cancelled_while_its_shared_state_is_signed_keeps_the_state(
    autojump_clock: MockClock,
) -> None:
    """Cancelled after the batch was taken: its amount is in the state, so the state is left in
    its slot (sent later), and a retry never pays the amount a second time."""
    client_ch, _ = funded(15, KC, KW)
    gated = _GatedWriter(MemoryKVStore())
    client_ch.writer = gated  # type: ignore[assignment]
    slots = {1000: _Queued(PayFor(1, 1000, 1000)), 2000: _Queued(PayFor(1, 2000, 2000))}
    scopes: dict[object, trio.CancelScope] = {}

    async def member(amount: int) -> None:
        with trio.CancelScope() as scope:
            scopes[trio.lowlevel.current_task()] = scope
            await client_ch.pay_shared(amount, 0.05, slots[amount])

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(member, 1000)
            n.start_soon(member, 2000)
            await gated.entered.wait()  # one of them signs the shared state now
            (other,) = [s for t, s in scopes.items() if t is not gated.writer_task]
            other.cancel()
            await trio.testing.wait_all_tasks_blocked()
            gated.gate.set()
    assert other.cancelled_caught
    st = slots[1000].state
    assert st is not None
    assert slots[2000].state == st
    assert st.sent == client_ch.core.r.own_sent == 3000


async def test_the_session_signing_a_shared_state_cancelled_does_not_fail_the_others(
    autojump_clock: MockClock,
) -> None:
    """A session whose generation dies while it signs the shared state: the state is still
    signed, the other sessions' payments go out, nothing is paid twice."""
    client_ch, _ = funded(16, KC, KW)
    gated = _GatedWriter(MemoryKVStore())
    client_ch.writer = gated  # type: ignore[assignment]
    slots = {1000: _Queued(PayFor(1, 1000, 1000)), 2000: _Queued(PayFor(1, 2000, 2000))}
    scopes: dict[object, trio.CancelScope] = {}
    results: dict[int, PayState] = {}

    async def member(amount: int) -> None:
        with trio.CancelScope() as scope:
            scopes[trio.lowlevel.current_task()] = scope
            results[amount] = await client_ch.pay_shared(amount, 0.05, slots[amount])

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(member, 1000)
            n.start_soon(member, 2000)
            await gated.entered.wait()
            signer = scopes[gated.writer_task]
            signer.cancel()
            await trio.testing.wait_all_tasks_blocked()
            gated.gate.set()
    assert signer.cancelled_caught
    (other,) = results.values()  # the other session got its state
    assert slots[1000].state == slots[2000].state == other
    assert other.sent == client_ch.core.r.own_sent == 3000
