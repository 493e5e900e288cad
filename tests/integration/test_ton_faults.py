"""Faults the soak does not reach, each ending in a typed error or a completed payment and no
lost state: the local chain killed in the middle of a commit, a disk that fills up while a
channel state is persisted, a corrupt channel store at restart, the wall clock jumping.

Real libp2p hosts on loopback and the real local chain (TVM, our contract) where the fault needs
them; the session shells over in-memory streams where it does not."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from pytoniq_core.boc.cell import Cell

from overlay import wire
from overlay.errors import CorruptStore, StoreError
from tests.integration.test_ton_payments import (
    CFG,
    PRICES,
    PROMPT,
    Net,
    connect,
    metered,
    open_net,
    wallet_of,
)
from tests.sim.test_ton_session import KC, KW, framed_pair, funded, open_msg, run_client, run_worker
from ton.channel import Channel, SettlementPolicy
from ton.manager import PaymentManager
from ton.metering import Prices
from ton.rpc import LocalChainClient, serve_localchain
from ton.session import ChannelShell, PayerSession, WorkerSession
from ton.store import MemoryKVStore, SQLiteKVStore

pytestmark = pytest.mark.slow
TON = 10**9


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in leaves(e)]
    return [group]


# ---------------------------------------------------------------------------- the chain killed


class Chain:
    """A local chain served over loopback that a test can kill and restart on the same port."""

    def __init__(self, nursery: trio.Nursery, data_dir: Path) -> None:
        self.nursery, self.data_dir = nursery, data_dir
        self.port = 0
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def start(self) -> tuple[str, int]:
        self.scope, self.stopped = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            try:
                with self.scope:
                    await serve_localchain(self.data_dir, port=self.port, task_status=task_status)
            finally:
                self.stopped.set()

        addr: tuple[str, int] = await self.nursery.start(run)
        self.port = addr[1]
        return addr

    async def kill(self) -> None:
        self.scope.cancel()
        with trio.fail_after(10):
            await self.stopped.wait()


class KilledAtSubmit(LocalChainClient):
    """The payee's chain client: the chain dies when a commit is submitted, ``when`` = before the
    message reaches it, or after the chain applied it (before the node hears the result)."""

    def __init__(self, chain: Chain, host: str, port: int, when: str) -> None:
        super().__init__(host, port, timeout=5.0)
        self.chain, self.when, self.armed = chain, when, False

    async def send_external(self, message: Cell) -> bytes:
        if not self.armed:
            return await super().send_external(message)
        self.armed = False
        if self.when == "before":
            await self.chain.kill()
            return await super().send_external(message)
        out = await super().send_external(message)
        await self.chain.kill()
        return out


@pytest.mark.parametrize("when", ["before", "after"])
async def test_the_local_chain_killed_mid_commit(
    tmp_path: Path, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The payee's driver commits as soon as 0.0001 TON is owed; the chain dies at that commit's
    submission. The commit fails with ChainError (counted, retried with back-off) and nothing the
    payee holds changes; once the chain is back (same data, same port) the retry lands (before)
    or finds the commit already there (after), and the chain shows exactly what was paid."""
    async with trio.open_nursery() as nursery:
        chain = Chain(nursery, tmp_path / "chain")
        addr = await chain.start()
        rpc = LocalChainClient(*addr)
        net = Net(rpc, nursery, tmp_path)
        payee_chain = KilledAtSubmit(chain, *addr, when=when)
        c = await net.start("client", chain=LocalChainClient(*addr))
        w = await net.start("worker", chain=payee_chain)  # CFG: commits from 100_000 nanoTON owed
        await connect(c, w)
        payee_chain.armed = True
        with trio.fail_after(60):
            await metered(c, w, 200)
            due = PRICES.cost(PROMPT, 200)
            await w.pm.wait_for(lambda: w.pm.counters["settle_failures"] >= 1)
            failures = [r.getMessage() for r in caplog.records if r.name == "ton.settlement"]
            assert any("failed: local chain at" in m for m in failures), failures  # ChainError
            (entry,) = w.pm.entries.values()
            assert entry.core.r.peer_sent == due  # nothing the payee holds changed
            assert entry.meta.status == "open"
            assert w.pm.store.read("channel", entry.cid.hex()) == wire.encode(entry.core.r)
            await chain.start()
            await w.pm.wait_for(
                lambda: entry.core.r.committed_seqno_a > 0 and entry.core.unsettled() < 100_000
            )
            data = await rpc.get_channel_state(entry.ops.address)
            assert data is not None
            assert data.sent_a + entry.core.unsettled() == due
            assert data.withdrawn_b == data.sent_a
            await metered(c, w, 40)  # and the channel keeps working
            assert entry.core.r.peer_sent == due + PRICES.cost(PROMPT, 40)
        for node in (c, w):
            await node.stop()
        for cl in (rpc, payee_chain):
            await cl.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- the disk full


class FillingDisk(MemoryKVStore):
    """A store whose disk is full once ``full`` is set: every write fails with ENOSPC."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def write(self, namespace: str, key: str, value: bytes) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(namespace, key, value)


async def test_a_full_disk_while_persisting_a_state_sends_nothing_and_loses_nothing() -> None:
    prices = Prices(10, 1000)
    client_ch, worker_ch = funded(21, KC, KW)
    disk = FillingDisk()
    disk.write("channel", client_ch.core.key_name, wire.encode(client_ch.core.r))  # the opened channel
    client_ch = ChannelShell(client_ch.core, disk)
    cs, wsx = framed_pair()
    ps = PayerSession(cs, client_ch, open_msg(21, prices), KW.public)
    ws = WorkerSession(wsx, worker_ch, KW)
    send, recv = trio.open_memory_channel[list[int]](0)

    async def client() -> None:
        await ps.start()
        async with trio.open_nursery() as n:
            await n.start(ps.run_receipts)
            async for chunk in recv:
                if client_ch.core.r.own_sent > prices.cost(20, 0):
                    disk.full = True  # the disk fills up in the middle of the answer
                await ps.received(chunk)
            await ps.close()

    async def session() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(run_worker, ws, send, 300)
            n.start_soon(client)

    with trio.fail_after(20), pytest.raises(BaseExceptionGroup) as caught:
        await session()
    errors = [e for e in leaves(caught.value) if not isinstance(e, trio.Cancelled)]
    assert errors
    assert all(isinstance(e, StoreError) for e in errors), errors
    assert "No space left" in str(errors[0])
    # the state that could not be persisted was never sent: the payee holds the last durable one,
    # the payer's channel is back at it (the payment is not counted as made), nothing is frozen
    durable = Channel.restore(client_ch.core.params, KC, disk.read("channel", client_ch.core.key_name) or b"")
    assert client_ch.core.r == durable.r
    assert worker_ch.core.r.peer_sent == client_ch.core.r.own_sent == durable.r.own_sent
    assert worker_ch.core.r.peer_seqno == client_ch.core.r.own_seqno
    assert prices.cost(20, 0) < client_ch.core.r.own_sent < prices.cost(20, 300)
    assert not client_ch.core.frozen
    # the disk has room again: the channel goes on, the next session paid exactly
    disk.full = False
    before = client_ch.core.r.own_sent
    cs, wsx = framed_pair()
    ps = PayerSession(cs, client_ch, attrs.evolve(open_msg(21, prices), session_id=b"next" * 4), KW.public)
    ws = WorkerSession(wsx, worker_ch, KW)
    send, recv = trio.open_memory_channel[list[int]](0)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(run_worker, ws, send, 50)
            n.start_soon(run_client, ps, recv)
    assert worker_ch.core.r.peer_sent == client_ch.core.r.own_sent == before + prices.cost(20, 50)


# ---------------------------------------------------------------------------- a corrupt store


class _NoHost:
    peer_id = "12D3KooWtest"

    async def open_stream(self, peer_id: str, protocol: str) -> Any:
        raise AssertionError("not used")

    def set_stream_handler(self, protocol: str, handler: Callable[..., Any]) -> None:
        raise AssertionError("not used")


async def _store_with_a_channel(tmp_path: Path) -> tuple[Path, str]:
    """A payee's payment store holding one open channel with payments, as a node leaves it."""
    async with open_net(tmp_path) as net:
        c, w = await net.start("client"), await net.start("worker")
        await connect(c, w)
        await metered(c, w, 40)
        (cid,) = w.pm.entries
        await c.stop()
        await w.stop()
    return tmp_path / "worker.sqlite", cid.hex()


def _manager(path: Path) -> PaymentManager:
    store = SQLiteKVStore(path)
    try:
        return PaymentManager(_NoHost(), LocalChainClient("127.0.0.1", 1), wallet_of("worker"), store, CFG)
    finally:
        store.close()


def _overwrite(path: Path, ns: str, key: str, value: bytes) -> None:
    db = sqlite3.connect(path)
    db.execute("UPDATE kv SET v = ? WHERE ns = ? AND k = ?", (value, ns, key))
    db.commit()
    db.close()


def _damage(path: Path, key: str, damage: str) -> None:
    if damage == "channel record":
        _overwrite(path, "channel", key, b"\x93garbage")
    elif damage == "channel meta":
        _overwrite(path, "channel_meta", key, b"\x01\x02")
    elif damage == "wrong key":  # a record filed under another channel's key
        db = sqlite3.connect(path)
        db.execute("UPDATE kv SET k = ? WHERE k = ?", ("00" * 16, key))
        db.commit()
        db.close()
    elif damage == "missing meta":
        db = sqlite3.connect(path)
        db.execute("DELETE FROM kv WHERE ns = 'channel_meta'")
        db.commit()
        db.close()
    else:
        for p in path.parent.glob("worker.sqlite-*"):
            p.unlink()
        path.write_bytes(b"this is not a database" * 200)


@pytest.mark.parametrize("damage", ["channel record", "channel meta", "wrong key", "missing meta", "file"])
async def test_a_corrupt_channel_store_at_restart_is_a_clear_error_never_a_reset(
    tmp_path: Path, damage: str
) -> None:
    path, key = await _store_with_a_channel(tmp_path)
    assert list(_manager(path).entries) == [bytes.fromhex(key)]  # intact: it restores
    _damage(path, key, damage)
    before = path.read_bytes()
    with pytest.raises(CorruptStore) as caught:
        _manager(path)
    assert str(path) in str(caught.value)  # names the file
    if damage != "file":
        assert ("00" * 16 if damage == "wrong key" else key) in str(caught.value)  # and the channel
    assert path.read_bytes() == before  # and leaves it as it is


# ---------------------------------------------------------------------------- the clock jumps


async def test_the_wall_clock_jumping_back_and_forth_keeps_every_amount_exact(net: Net) -> None:
    """Settlement runs on the injected wall clock, metering on trio's monotonic clock: a wall
    clock that jumps a day back and forth in the middle of sessions changes no amount, aborts no
    session and makes no commit fail; the timer commit fires once the clock passes its interval."""
    wall = [1_900_000_000.0]
    policy = SettlementPolicy(interval=24 * 3600.0, close_idle=0.0)
    c = await net.start("client", clock=lambda: wall[0])
    w = await net.start("worker", cfg=attrs.evolve(CFG, policy=policy), clock=lambda: wall[0])
    await connect(c, w)
    with trio.fail_after(60):
        wall[0] -= 86_400  # back a day
        await metered(c, w, 100)
        wall[0] += 3 * 3600  # forward a few hours
        await metered(c, w, 100)
        due = 2 * PRICES.cost(PROMPT, 100)
        (entry,) = w.pm.entries.values()
        assert entry.core.r.peer_sent == due == c.pm.statistics().spent
        await w.pm.tick_once()  # no timer yet: the clock is behind where it started
        assert w.pm.counters["commits"] == w.pm.counters["settle_failures"] == 0
        wall[0] += 2 * 86_400  # past the interval
        await w.pm.tick_once()
        await w.pm.wait_for(lambda: w.pm.counters["commits"] == 1)
        data = await net.svc.get_channel_state(entry.ops.address)
        assert data is not None
        assert (data.sent_a, entry.core.unsettled()) == (due, 0)
        assert w.pm.counters["settle_failures"] == 0


@pytest.fixture
async def net(tmp_path: Path) -> Any:
    async with open_net(tmp_path) as n:
        yield n
