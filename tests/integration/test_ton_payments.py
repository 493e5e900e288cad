"""The payment manager over real libp2p hosts on loopback and the local chain (real TVM, our
contract): two nodes open a channel, meter a session, the payee's policy commits on chain, the
payee restarts and keeps being paid, a cooperative close pays out exactly; a hub session through
a proxy; a top-up; a forced close when the payee vanished.

The helpers here (Net, Node, metered) are shared with ``test_ton_payments_bad.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from overlay.errors import TransportError
from overlay.host import Overlay, OverlaySettings, open_overlay
from overlay.identity import Identity
from ton import contract as C
from ton.chain import ChainClient
from ton.channel import SettlementPolicy
from ton.keys import KeyPair
from ton.localchain import LocalChain
from ton.localservice import LocalChainService
from ton.manager import PaymentConfig, PaymentManager
from ton.metering import MeterConfig, MeteringError, Prices
from ton.onchain import OP_GAS
from ton.opening import ChannelTerms, UnknownChannel
from ton.paysessions import Route
from ton.rpc import LocalChainClient, serve_localchain
from ton.session import PayerSession
from ton.store import SQLiteKVStore
from ton.wallets import Wallet

pytestmark = pytest.mark.slow

TON = 10**9
SETTINGS = OverlaySettings(gossip=False, dial_timeout_s=3)
# Settle as soon as anything is owed; short intervals so the driver acts within a test.
CFG = PaymentConfig(
    terms=ChannelTerms(deposit=2 * TON, quarantine=3600),
    policy=SettlementPolicy(threshold=100_000),
    meter=MeterConfig(pause_timeout=2.0, idle_timeout=5.0),
    tick_interval=0.05,
    watch_interval=3600.0,
    request_timeout=5.0,
    chain_timeout=10.0,
    open_timeout=20.0,
    claim_timeout=5.0,
)


def wallet_of(name: str) -> Wallet:
    return Wallet(KeyPair.from_seed(hashlib.sha256(name.encode()).digest()))


class Node:
    """One node: an overlay host and a payment manager, both living in their own task."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ov: Overlay
        self.pm: PaymentManager
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    @property
    def peer_id(self) -> str:
        return self.ov.peer_id

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(10):
            await self.stopped.wait()


class Net:
    def __init__(self, svc: LocalChainService | LocalChainClient, nursery: trio.Nursery, tmp: Path) -> None:
        self.svc, self.nursery, self.tmp = svc, nursery, tmp
        self.identities: dict[str, Identity] = {}

    async def fund(self, wallet: Wallet, amount: int = 50 * TON) -> None:
        if (await self.svc.get_account(wallet.address())).status == "nonexist":
            await self.svc.fund(wallet.address(), amount, wallet.state_init())

    async def start(
        self,
        name: str,
        *,
        cfg: PaymentConfig = CFG,
        chain: ChainClient | None = None,
        wipe: bool = False,
        **kw: Any,
    ) -> Node:
        """Start (or restart: same identity, wallet and store) the node ``name``; ``wipe``: with
        its payment store lost."""
        identity = self.identities.setdefault(name, Identity.generate())
        wallet = wallet_of(name)
        await self.fund(wallet)
        node = Node(name)
        path = self.tmp / f"{name}.sqlite"
        if wipe:
            for p in self.tmp.glob(f"{name}.sqlite*"):
                p.unlink()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            store = SQLiteKVStore(path)
            try:
                with node.scope:
                    async with open_overlay(identity, SETTINGS) as ov:
                        node.ov = ov
                        node.pm = PaymentManager(ov, chain or self.svc, wallet, store, cfg, **kw)
                        await node.pm.run(task_status=task_status)
            finally:
                store.close()
                node.stopped.set()

        await self.nursery.start(run)
        return node


async def connect(*nodes: Node) -> None:
    for a in nodes:
        for b in nodes:
            if a is not b:
                await a.ov.connect(b.ov.listen_addrs()[0])


async def payouts(svc: ChainClient, address: str, after_lt: int, op: int) -> list[int]:
    return [t.in_value for t in await svc.transactions(address, after_lt) if t.in_op == op]


PRICES = Prices(prompt=10, completion=1000)
PROMPT = 20


async def metered(
    payer: Node,
    payee: Node,
    tokens: int,
    *,
    via: Node | None = None,
    prices: Prices = PRICES,
    worker_prices: Prices | None = None,
    session_id: bytes | None = None,
) -> PayerSession:
    """One generation of ``tokens`` fake token ids: the payee meters them, the payer pays."""
    sid = session_id or os.urandom(16)
    send, recv = trio.open_memory_channel[list[int]](0)
    first_hop = via or payee
    out: list[PayerSession] = []

    async def worker() -> None:
        async with payee.pm.serve_session(
            sid, min_prices=worker_prices or prices, payer=(via or payer).peer_id
        ) as ws:
            async with send:
                for i in range(0, tokens, 4):
                    chunk = list(range(i, min(i + 4, tokens)))
                    await ws.produced(chunk)  # waits while the credit window is used up
                    await send.send(chunk)

    async def client() -> None:
        async with payer.pm.pay_session(
            first_hop.peer_id, session_id=sid, offer_id=b"offer-1", prices=prices,
            prompt_tokens=PROMPT, max_tokens=512, worker_key=payee.pm.key.public,
        ) as ps:  # fmt: skip
            async for chunk in recv:
                await ps.received(chunk)
        out.append(ps)

    with trio.fail_after(30):
        try:
            async with trio.open_nursery() as n:
                n.start_soon(worker)
                n.start_soon(client)
        except ExceptionGroup as group:  # the first typed error, as the node would see it
            raise group.exceptions[0] from None
    return out[0]


@asynccontextmanager
async def open_net(tmp: Path) -> AsyncIterator[Net]:
    """A local chain in this process and a nursery for nodes (cancelled at the end)."""
    svc = LocalChainService(LocalChain())
    async with trio.open_nursery() as nursery:
        yield Net(svc, nursery, tmp)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    async with open_net(tmp_path) as n:
        yield n


async def test_open_meter_commit_restart_close_pays_exactly(tmp_path: Path) -> None:
    """Over the local chain's RPC (one chain process, every node a client, as on a devnet)."""
    clients: list[LocalChainClient] = []
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(partial(serve_localchain, tmp_path / "chain"))

        def client() -> LocalChainClient:
            clients.append(LocalChainClient(*addr))
            return clients[-1]

        chain = client()
        net = Net(chain, nursery, tmp_path)
        due1 = PRICES.cost(PROMPT, 300)
        c = await net.start("client", chain=client())
        # the payee commits once everything is paid: its threshold is the session's price
        policy = SettlementPolicy(threshold=due1)
        w = await net.start("worker", chain=client(), cfg=attrs.evolve(CFG, policy=policy))
        await connect(c, w)
        with trio.fail_after(60):
            ps = await metered(c, w, 300)
            assert [r.tokens for r in ps.receipts] == [128, 256, 300]
            (entry,) = c.pm.entries.values()
            cid, address = entry.cid, entry.ops.address
            # the payee's policy commits by itself; the commit lands on chain
            payee = w.pm.entries[cid]
            await w.pm.wait_for(lambda: w.pm.counters["commits"] >= 1 and payee.core.unsettled() == 0)
            data = await chain.get_channel_state(address)
            assert data is not None
            assert (data.sent_a, data.withdrawn_b, data.deposit_a) == (due1, due1, 2 * TON)
            assert await payouts(chain, wallet_of("worker").address(), 0, C.Op.WITHDRAWN) == [due1]

            # the payee restarts (same identity, data and wallet): the channel comes back from disk
            await w.stop()
            w = await net.start("worker", chain=client(), cfg=attrs.evolve(CFG, policy=SettlementPolicy()))
            restored = w.pm.entries[cid]
            assert (restored.meta.status, restored.core.r.peer_sent) == ("open", due1)
            await connect(c, w)
            await metered(c, w, 200)
            due2 = PRICES.cost(PROMPT, 200)
            assert w.pm.entries[cid].core.r.peer_sent == due1 + due2
            assert w.pm.counters["commits"] == 0  # default threshold: nothing settled yet

            # a cooperative close (the payer asks) pays the payee exactly what is left
            lt_w = (await chain.get_account(wallet_of("worker").address())).last_lt
            lt_c = (await chain.get_account(wallet_of("client").address())).last_lt
            assert await c.pm.close(w.peer_id) == 1
            await w.pm.wait_for(lambda: w.pm.entries[cid].meta.status == "closed")
        to_w = await payouts(chain, wallet_of("worker").address(), lt_w, C.Op.CLOSED_PAYOUT)
        to_c = await payouts(chain, wallet_of("client").address(), lt_c, C.Op.CLOSED_PAYOUT)
        assert to_w == [due2]
        (back,) = to_c  # the deposit minus what was paid, plus what is left of the gas reserve
        assert 2 * TON - due1 - due2 - 20_000_000 < back <= 2 * TON - due1 - due2 + 10_000_000
        cs, ws = c.pm.statistics(), w.pm.statistics()
        assert (cs.spent, ws.earned) == (due1 + due2, due1 + due2)
        assert cs.live_channels == ws.live_channels == 0
        assert c.pm.status_section()["channels"][0]["status"] == "closed"  # type: ignore[index]
        for node in (c, w):
            await node.stop()
        for cl in clients:
            await cl.aclose()
        nursery.cancel_scope.cancel()


async def test_commits_during_a_busy_session_do_not_disturb_it(net: Net) -> None:
    """The payee commits whenever 0.05 TON are owed, while the payer keeps paying (states may be
    in flight while a commit is proposed): the session is paid exactly, every commit lands."""
    policy = SettlementPolicy(threshold=50_000)
    c, w = await net.start("client"), await net.start("worker", cfg=attrs.evolve(CFG, policy=policy))
    await connect(c, w)
    await metered(c, w, 400)
    due = PRICES.cost(PROMPT, 400)
    (payee,) = w.pm.entries.values()
    with trio.fail_after(20):
        await w.pm.wait_for(lambda: payee.core.unsettled() < 50_000)  # no commit is left to do
    data = await net.svc.get_channel_state(payee.ops.address)
    assert data is not None
    assert w.pm.counters["commits"] >= 1
    assert data.sent_a + payee.core.unsettled() == due == payee.core.r.peer_sent
    assert w.pm.counters["settle_failures"] == 0


async def test_hub_session_through_a_proxy_keeps_its_fee(net: Net) -> None:
    c, p, w = [await net.start(n) for n in ("client", "proxy", "worker")]
    await connect(c, p, w)
    worker_prices = Prices(prompt=8, completion=900)
    routed: list[tuple[bytes, str]] = []

    async def route(open_msg: Any, payer: str) -> Route | None:
        routed.append((open_msg.offer_id, payer))
        return Route(w.peer_id, worker_prices)

    p.pm.set_router(route)
    ps = await metered(c, w, 200, via=p, worker_prices=worker_prices)
    assert routed == [(b"offer-1", c.peer_id)]
    assert ps.receipts[-1].final  # the worker's receipts reach the client through the proxy
    client_paid, worker_paid = PRICES.cost(PROMPT, 200), worker_prices.cost(PROMPT, 200)
    assert c.pm.statistics().spent == client_paid
    assert w.pm.statistics().earned == worker_paid
    with trio.fail_after(5):  # the proxy's side ends just after the worker's
        await p.pm.wait_for(lambda: p.pm.counters["sessions_forwarded"] == 1)
    stats = p.pm.statistics()
    assert (stats.earned, stats.spent) == (client_paid, worker_paid)
    assert stats.forward_fees == client_paid - worker_paid
    assert p.pm.counters["sessions_forwarded"] == 1
    assert {ch.role for ch in stats.channels} == {"payer", "payee"}

    async def no_route(open_msg: Any, payer: str) -> Route | None:
        return None

    p.pm.set_router(no_route)  # the proxy knows no such offer: refused at once, nothing paid
    with trio.fail_after(5), pytest.raises(MeteringError):
        await metered(c, w, 10, via=p, worker_prices=worker_prices)
    assert c.pm.statistics().spent == client_paid


async def test_top_up_when_low_then_forced_close_when_the_payee_vanished(net: Net) -> None:
    cfg = attrs.evolve(CFG, terms=attrs.evolve(CFG.terms, deposit=TON // 2))
    c, w = await net.start("client", cfg=cfg), await net.start("worker", cfg=cfg)
    await connect(c, w)
    with trio.fail_after(30):
        entry = await c.pm.channel_to(w.peer_id)
        assert entry.core.r.deposit_a == TON // 2
        await metered(c, w, 100)
        due = PRICES.cost(PROMPT, 100)
        # more is needed than is left: the payer tops up, the payee re-reads the deposit
        again = await c.pm.channel_to(w.peer_id, min_available=TON // 2 + 1)
        assert again is entry
        assert entry.core.r.deposit_a == TON
        assert c.pm.counters["top_ups"] == 1
        await w.pm.wait_for(lambda: w.pm.entries[entry.cid].core.r.deposit_a == TON)
    await w.stop()
    lt_c = (await net.svc.get_account(wallet_of("client").address())).last_lt
    with trio.fail_after(30):
        with pytest.raises(TransportError):
            await c.pm.close(w.peer_id)  # cooperative only: the payee is gone
        assert await c.pm.close(w.peer_id, force=True) == 1
        assert entry.meta.status == "disputed"
        await c.pm.watch_once()  # too early: the quarantine runs
        assert entry.meta.status == "disputed"
        assert isinstance(net.svc, LocalChainService)
        await net.svc.advance_time(3601)
        await c.pm.watch_once()  # the watcher finishes the close after the quarantine
    assert entry.meta.status == "closed"
    to_w = await payouts(net.svc, wallet_of("worker").address(), 0, C.Op.CLOSED_PAYOUT)
    to_c = await payouts(net.svc, wallet_of("client").address(), lt_c, C.Op.CLOSED_PAYOUT)
    # the payee gets what it was paid (the last commit withdrew some, the close the rest)
    withdrawn = await payouts(net.svc, wallet_of("worker").address(), 0, C.Op.WITHDRAWN)
    assert sum(to_w) + sum(withdrawn) == due
    # the payer gets its deposits back minus what it paid, plus what is left of the gas its
    # transactions carried (two top-up reserves of 0.01 TON and the close's 0.05 TON)
    (back,) = to_c
    assert TON - due < back <= TON - due + 2 * C.TOP_UP_GAS_RESERVE + OP_GAS
    assert c.pm.counters["uncooperative"] == 1


async def test_recovery_interrupted_deploy_forgetful_payee_and_idle_close(net: Net) -> None:
    assert isinstance(net.svc, LocalChainService)
    svc = net.svc
    clock = [1_900_000_000.0]
    idle = attrs.evolve(CFG, policy=SettlementPolicy(close_idle=3600.0))
    c, w = await net.start("client", cfg=idle, clock=lambda: clock[0]), await net.start("worker")
    await connect(c, w)
    with trio.fail_after(30):
        first = await c.pm.channel_to(w.peer_id)
        # the payer crashed between deploying and hearing the payee's confirmation
        await c.pm._save_meta(first, status="deploying")
        await c.stop()
        c = await net.start("client", cfg=idle, clock=lambda: clock[0])
        assert c.pm.entries[first.cid].meta.status == "deploying"
        await c.pm.watch_once()  # the chain shows it deployed: adopted
        assert c.pm.entries[first.cid].meta.status == "open"
        await connect(c, w)
        await metered(c, w, 40)
        due = PRICES.cost(PROMPT, 40)

        # the payee lost its payment store: the payer's next session is refused, the channel is
        # retired (closed unilaterally in the background) and a fresh one serves the session
        await w.stop()
        w = await net.start("worker", wipe=True)
        await connect(c, w)
        with pytest.raises(UnknownChannel):
            await metered(c, w, 8)
        old = c.pm.entries[first.cid]
        await c.pm.wait_for(lambda: old.meta.status == "disputed")
        await metered(c, w, 40)
        fresh = c.pm.payer_channel(w.peer_id)
        assert fresh is not None
        assert fresh.cid != first.cid
        # the quarantine passes: the old channel pays out what the lost payee had earned
        lt = (await svc.get_account(wallet_of("worker").address())).last_lt
        await svc.advance_time(3601)
        await c.pm.watch_once()
        assert old.meta.status == "closed"
        assert await payouts(svc, wallet_of("worker").address(), lt, C.Op.CLOSED_PAYOUT) == [due]

        # an hour without sessions: the payer's policy closes the fresh channel cooperatively
        clock[0] += 3601
        await c.pm.wait_for(lambda: fresh.meta.status == "closed")
    assert c.pm.statistics().live_channels == 0
