"""Payments benchmark: signed state updates per second, metering CPU share, on-chain operations
and fees per million tokens at the default thresholds and prices. Prints a table.

Two metering figures: the cores alone (meters, channel cores, SQLite), and the whole trio path
(PayerSession / WorkerSession over framed in-memory streams: wire codec, locks, the fsync'd
writes) with streams paced in virtual time (trio's MockClock, so the number of signed states is
the real one), against a baseline of the same streams without payments, alternated in the same
run (the least CPU of several rounds counts). Both sides run in this process. Stores are warmed
up first: a running node's SQLite WAL is rewritten in place, a fresh one grows (dearer fsyncs).

Run: ``python bench/payments.py`` (about 15 s). The machine is shared: treat timings as rough.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from trio.testing import MockClock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay.streams import FramedStream, memory_stream_pair
from ton import contract as C
from ton.channel import Channel, Persist, Send, Settle, SettlementPolicy
from ton.keys import KeyPair
from ton.localchain import LocalChain
from ton.localservice import LocalChainService
from ton.messages import PayState, SessionOpen, SessionPayment
from ton.metering import DEFAULT_PRICES, MeterConfig, PayerMeter, PayFor, WorkerMeter
from ton.onchain import ChannelOps
from ton.session import ChannelShell, PayerSession, WorkerSession
from ton.store import DurableWriter, KVStore, MemoryKVStore, SQLiteKVStore
from ton.wallets import Wallet

TON = 10**9
KA, KB = KeyPair.from_seed(b"a" * 32), KeyPair.from_seed(b"b" * 32)
PARAMS = C.ChannelParams(1, KA.public, KB.public, Wallet(KA).address(), Wallet(KB).address())
DEPOSIT = 1000 * TON


def opened(policy: SettlementPolicy | None = None) -> tuple[Channel, Channel]:
    data = C.ChannelData(C.Status.OPEN, 1, KA.public, KB.public, DEPOSIT, 0, 0, 0, 0, 0, 0, 0, 3600, TON)
    a, b = Channel(PARAMS, C.PARTY_A, KA), Channel(PARAMS, C.PARTY_B, KB, policy=policy)
    for ch in (a, b):
        for e in ch.sync_onchain(data, 0.0):
            assert isinstance(e, Persist)
            ch.persisted(e.update_id)
    return a, b


def warmed(path: Path) -> SQLiteKVStore:
    """A store in the steady state of a running node: its WAL has grown and is rewritten in place
    (a fresh file's first commits also grow the file, and cost more per fsync)."""
    store = SQLiteKVStore(path)
    for i in range(600):
        store.write("warm-up", str(i % 8), b"x" * 400)
    for i in range(8):
        store.remove("warm-up", str(i))
    return store


def apply(ch: Channel, store: KVStore, effects: Sequence[object]) -> list[Any]:
    out = []
    for e in effects:
        if isinstance(e, Persist):
            store.write(e.namespace, e.key, e.blob)
            ch.persisted(e.update_id)
        else:
            out.append(e)
    return out


def state_updates(store_a: KVStore, store_b: KVStore, n: int) -> float:
    """Updates per second: A signs + persists, B verifies + persists."""
    a, b = opened()
    t0 = time.perf_counter()
    for _ in range(n):
        (send,) = apply(a, store_a, a.pay(1000))
        assert isinstance(send, Send)
        assert isinstance(send.msg, PayState)
        apply(b, store_b, b.receive_state(send.msg))
    return n / (time.perf_counter() - t0)


def metering_cpu_share(tokens: int = 20_000, streams: int = 50) -> tuple[float, float]:
    """CPU seconds per second of 1,000 tokens/s of streams, as a share of one core, for the worker
    (meter, receipts, verify + persist each state) and for the client (meter, sign + persist).
    Persistence is SQLite WAL with fsync. Both sides run here; each is timed on its own."""
    cfg = MeterConfig()
    pt = time.process_time
    with tempfile.TemporaryDirectory() as d:
        sa, sb = warmed(Path(d) / "a.sqlite"), warmed(Path(d) / "b.sqlite")
        a, b = opened()
        payers = [PayerMeter(bytes([i]) * 16, DEFAULT_PRICES, 0, KB.public, cfg, 0.0) for i in range(streams)]
        workers = [WorkerMeter(bytes([i]) * 16, DEFAULT_PRICES, 0, KB, cfg, 0.0) for i in range(streams)]
        client_cpu = worker_cpu = 0.0
        now = 0.0
        for step in range(0, tokens // streams, 4):
            now += 0.004 * streams / 4
            for p, w in zip(payers, workers, strict=True):
                chunk = [step, step + 1, step + 2, step + 3]
                t0 = pt()
                receipts = w.on_generated(chunk, now)
                t1 = pt()
                for r in receipts:
                    p.on_receipt(r.receipt)
                pays = p.on_tokens(chunk, now)
                states = []
                for pf in pays:
                    assert isinstance(pf, PayFor)
                    (send,) = apply(a, sa, a.pay(pf.amount))
                    states.append((pf, send.msg))
                t2 = pt()
                for pf, st in states:
                    got = apply(b, sb, b.receive_state(st))
                    w.on_payment(SessionPayment(p.session_id, pf.tokens, pf.total, st), got[0].amount, now)
                t3 = pt()
                worker_cpu += (t1 - t0) + (t3 - t2)
                client_cpu += t2 - t1
        sa.close()
        sb.close()
    seconds = tokens / 1000.0
    return worker_cpu / seconds, client_cpu / seconds


async def _streams(
    metered: bool, d: Path, seconds: float, streams: int, rate: float, cfg: MeterConfig | None = None
) -> tuple[float, int, int]:
    """``streams`` generations at ``rate`` tokens/s each, one token per chunk, for ``seconds``
    (virtual time: run under trio's MockClock); returns (CPU seconds, tokens, states signed).
    With ``metered``, each is a paid session on one channel shared by all of them."""
    a, b = opened()
    sa, sb = warmed(d / f"a{os.getpid()}.sqlite"), warmed(d / f"b{os.getpid()}.sqlite")
    # inline writes (a fast disk): the virtual clock would jump while a thread writes
    wa, wb = DurableWriter(sa, inline=True), DurableWriter(sb, inline=True)
    pay_ch, recv_ch = ChannelShell(a, sa, wa), ChannelShell(b, sb, wb)
    count = [0]
    deadline = trio.current_time() + seconds

    async def one(k: int) -> None:
        send, recv = trio.open_memory_channel[list[int]](0)
        x, y = memory_stream_pair()
        cs, ws_ = FramedStream(x, peer_id="c"), FramedStream(y, peer_id="w")
        sid = os.urandom(16)
        om = SessionOpen(sid, b"o", a.cid, DEFAULT_PRICES.prompt, DEFAULT_PRICES.completion, 50, 10**6)
        ps = PayerSession(cs, pay_ch, om, KB.public, cfg)
        ws = WorkerSession(ws_, recv_ch, KB)

        async def worker() -> None:
            if metered:
                await ws.accept()
            async with trio.open_nursery() as n:
                if metered:
                    await n.start(ws.run_payments)
                async with send:
                    i = 0
                    next_at = trio.current_time() + k / (streams * rate)
                    while next_at < deadline:
                        await trio.sleep_until(next_at)
                        next_at += 1 / rate
                        if metered:
                            await ws.produced([i])
                        await send.send([i])
                        i += 1
                if metered:
                    await ws.finish()

        async def client() -> None:
            if metered:
                await ps.start()
            async with trio.open_nursery() as n:
                if metered:
                    await n.start(ps.run_receipts)
                async for chunk in recv:
                    count[0] += 1
                    if metered:
                        await ps.received(chunk)
                if metered:
                    await ps.close()

        async with trio.open_nursery() as n:
            n.start_soon(worker)
            n.start_soon(client)

    t0 = time.process_time()
    async with trio.open_nursery() as n:
        for k in range(streams):
            n.start_soon(one, k)
    cpu = time.process_time() - t0
    sa.close()
    sb.close()
    return cpu, count[0], a.r.own_seqno


def full_path_share(
    seconds: float = 3.0,
    streams: int = 20,
    rate: float = 50.0,
    rounds: int = 5,
    cfg: MeterConfig | None = None,
) -> tuple[float, float, float]:
    """CPU seconds per token (baseline, metered; both sides) and states per 1,000 tokens.
    Baseline and metered runs alternate ``rounds`` times; the least CPU of each counts (the
    machine is shared: the minimum is the run least disturbed by others)."""
    base: list[float] = []
    metered: list[float] = []
    per_k = 0.0
    with tempfile.TemporaryDirectory() as d:
        for _ in range(rounds):
            for on, out in ((False, base), (True, metered)):
                cpu, n, states = trio.run(
                    _streams, on, Path(d), seconds, streams, rate, cfg, clock=MockClock(autojump_threshold=0)
                )
                out.append(cpu / n)
                if on:
                    per_k = 1000 * states / n
    return min(base), min(metered), per_k


async def measured_fees() -> dict[str, int]:
    """Real fees (nanoTON) of each channel operation on the local chain (mainnet config)."""
    clock = [1_800_000_000.0]
    svc = LocalChainService(LocalChain(), lambda: clock[0])
    wa, wb = Wallet(KA), Wallet(KB)
    for w in (wa, wb):
        await svc.fund(w.address(), 100 * TON, w.state_init())
    params = C.ChannelParams(2, KA.public, KB.public, wa.address(), wb.address())
    ops_a = ChannelOps(svc, wa, params)

    async def cost(fn: Callable[[], Awaitable[object]]) -> int:
        before = {
            x: (await svc.get_account(x)).last_lt for x in (wa.address(), wb.address(), params.address())
        }
        await fn()
        total = 0
        for addr, lt in before.items():
            total += sum(t.total_fees for t in await svc.transactions(addr, lt))
        return total

    fees = {"open (deploy + top-up)": await cost(lambda: ops_a.top_up(C.PARTY_A, 10 * TON))}
    data = await svc.get_channel_state(params.address())
    assert data is not None
    a, b = Channel(params, C.PARTY_A, KA), Channel(params, C.PARTY_B, KB)
    ms, mb = MemoryKVStore(), MemoryKVStore()
    apply(a, ms, a.sync_onchain(data, 0.0))
    apply(b, mb, b.sync_onchain(data, 0.0))
    (send,) = apply(a, ms, a.pay(TON))
    apply(b, mb, b.receive_state(send.msg))

    async def coop(close: bool) -> None:
        (prop,) = apply(b, mb, b.propose(close=close))
        (sig,) = apply(a, ms, a.receive_proposal(prop.msg))
        (sub,) = apply(b, mb, b.receive_signature(sig.msg))
        await ChannelOps(svc, wb, params).submit(sub.body)
        d = await svc.get_channel_state(params.address())
        assert d is not None
        for ch, st in ((a, ms), (b, mb)):
            apply(ch, st, ch.sync_onchain(d, 1.0))

    fees["commit (withdraw)"] = await cost(lambda: coop(False))
    (send,) = apply(a, ms, a.pay(TON))
    apply(b, mb, b.receive_state(send.msg))
    fees["cooperative close"] = await cost(lambda: coop(True))
    return fees


def ops_per_million(policy: SettlementPolicy) -> tuple[int, int]:
    """Commits the default policy triggers while 1M completion tokens are paid in 32-token states
    (with a tick every 500 ms of 50 tokens/s streaming); returns (commits, revenue nanoTON)."""
    a, b = opened(policy)
    ms, mb = MemoryKVStore(), MemoryKVStore()
    commits = 0
    now = 0.0
    step = 32
    for _ in range(1_000_000 // step):
        (send,) = apply(a, ms, a.pay(step * DEFAULT_PRICES.completion))
        apply(b, mb, b.receive_state(send.msg))
        now += step / 50
        for e in b.tick(now):
            if isinstance(e, Settle):
                commits += 1
                r = b.r
                data = C.ChannelData(
                    C.Status.OPEN, 1, KA.public, KB.public, DEPOSIT, 0, 0, r.withdrawn_b, r.peer_sent, 0,
                    r.peer_seqno, 0, 3600, TON,
                )  # fmt: skip
                apply(b, mb, b.sync_onchain(data, now))
    return commits, b.r.peer_sent


def main() -> None:
    rows: list[tuple[str, str, str]] = []
    n = 2000
    mem = state_updates(MemoryKVStore(), MemoryKVStore(), n)
    with tempfile.TemporaryDirectory() as d:
        sa, sb = warmed(Path(d) / "a.sqlite"), warmed(Path(d) / "b.sqlite")
        disk = state_updates(sa, sb, n // 4)
        sa.close()
        sb.close()
    rows.append(("signed state updates/s (sign+verify, in-memory store)", f"{mem:,.0f}", "baseline"))
    rows.append(("signed state updates/s (sign+verify+persist, SQLite WAL fsync)", f"{disk:,.0f}", ""))
    worker_share, client_share = metering_cpu_share()
    rows.append(("metering CPU share of one core at 1,000 tokens/s: worker", f"{worker_share:.2%}", "<= 1%"))
    rows.append(("metering CPU share of one core at 1,000 tokens/s: client", f"{client_share:.2%}", "<= 1%"))
    us = "us of CPU per token, both sides"
    for seconds, label, cfg in (
        (3.0, "150-token sessions", None),
        (10.0, "500-token sessions", None),
        (3.0, "150-token sessions, a state per payment", MeterConfig(coalesce_window=0.0)),
    ):
        base, metered, per_k = full_path_share(seconds, cfg=cfg)
        rows.append((f"20 streams x 50 tokens/s, {label}", "", ""))
        rows.append(("  trio path, no payments (baseline)", f"{base * 1e6:.1f}", us))
        rows.append(("  trio path, metered and paid", f"{metered * 1e6:.1f}", us))
        rows.append(("  signed states per 1,000 tokens", f"{per_k:.1f}", "32 tokens or 0.5 s per session"))
        share = (metered - base) / 2 * 1000  # CPU seconds per second at 1,000 tokens/s, one side
        rows.append(("  metering share of one core at 1,000 tokens/s, per side", f"{share:.2%}", "<= 1%"))
    policy = SettlementPolicy()
    commits, revenue = ops_per_million(policy)
    rows.append(("on-chain commits per 1M completion tokens (default policy)", str(commits), "<= 2"))
    rows.append(("  + open and close, once per channel lifetime", "2", ""))
    fees = trio.run(measured_fees)
    for name, fee in fees.items():
        rows.append((f"fee: {name}", f"{fee / TON:.4f} TON", "measured, mainnet config"))
    price = f"{DEFAULT_PRICES.completion} nTON/token"
    rows.append(("revenue per 1M tokens at default prices", f"{revenue / TON:.3f} TON", price))
    steady = commits * fees["commit (withdraw)"]
    rows.append(("fees / revenue, steady state (commits)", f"{steady / revenue:.2%}", "<= 1%"))
    life = fees["open (deploy + top-up)"] + fees["cooperative close"]
    for millions in (1, 10):
        share = (life + millions * steady) / (millions * revenue)
        rows.append((f"fees / revenue incl. open + close, channel of {millions}M tokens", f"{share:.2%}", ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>16}  note")
    print("-" * (width + 40))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")


if __name__ == "__main__":
    main()
