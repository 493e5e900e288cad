"""Bad input to the payment manager over real libp2p hosts and the local chain: a payee that lies
about the channel parameters, payers that do not fund what they announced, a chain that shows
foreign code, replays and garbage on ``/cocoon/pay/1``. Every case ends in a typed error (an
error frame with its code on the wire), no money lost and no state changed; the node keeps
serving."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from overlay import wire
from overlay.errors import NodeError, StreamBroken
from overlay.framing import uvarint
from overlay.host import open_overlay
from overlay.identity import Identity
from overlay.streams import FramedStream
from tests.integration.test_ton_payments import (
    PRICES,
    PROMPT,
    SETTINGS,
    TON,
    Net,
    connect,
    metered,
    open_net,
    wallet_of,
)
from ton import contract as C
from ton.channel import BadSignature
from ton.localservice import LocalChainService
from ton.messages import (
    ChannelCheck,
    ChannelChecked,
    CommitProposal,
    OpenAccept,
    OpenChannel,
    PayState,
    Receipt,
    SessionAccept,
    SessionOpen,
    SessionPayment,
)
from ton.metering import Prices
from ton.onchain import ChannelOps
from ton.opening import (
    PROTOCOL,
    ChannelMismatch,
    ChannelOpenError,
    check_accept,
    derive_channel_id,
)
from ton.paysessions import Route
from ton.wallets import Wallet

pytestmark = pytest.mark.slow


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    async with open_net(tmp_path) as n:
        yield n


async def ask(stream: FramedStream, msg: object) -> object:
    """Send ``msg``, return the answer (an ErrorFrame is returned, not raised)."""
    with trio.fail_after(10):
        await stream.send(msg)
        return await stream.receive()


def code_of(answer: object) -> str:
    assert isinstance(answer, wire.ErrorFrame), answer
    return answer.code


def offer(wallet: Wallet, **kw: Any) -> OpenChannel:
    base = OpenChannel(os.urandom(32), wallet.keys.public, wallet.address(), TON, 3600, TON)
    return attrs.evolve(base, **kw)


LIES = ["channel id", "channel address", "our own key", "payout address", "address in use"]


@pytest.mark.parametrize("lie", LIES)
async def test_a_payee_that_lies_is_caught_before_any_money_moves(net: Net, lie: str) -> None:
    c = await net.start("client")
    liar_wallet = wallet_of("liar")

    async def liar(stream: FramedStream) -> None:
        msg = await stream.receive()
        assert isinstance(msg, OpenChannel)
        nonce, key, addr = os.urandom(32), liar_wallet.keys.public, liar_wallet.address()
        if lie == "our own key":
            key = msg.key
        cid = derive_channel_id(msg.nonce, nonce, msg.key, key)
        params = C.ChannelParams(cid, msg.key, key, msg.address, addr, msg.quarantine, msg.fine)
        acc = OpenAccept(nonce, key, addr, cid.to_bytes(16, "big"), params.address())
        if lie == "channel id":
            acc = attrs.evolve(acc, channel_id=os.urandom(16))
        elif lie == "channel address":
            acc = attrs.evolve(acc, channel_address=attrs.evolve(params, quarantine=60).address())
        elif lie == "payout address":
            acc = attrs.evolve(acc, address="not-an-address")
        elif lie == "address in use":  # an honest answer, but the address already exists on chain
            await net.svc.fund(params.address(), TON)
        await stream.send(acc)
        await stream.receive()

    async with open_overlay(Identity.generate(), SETTINGS) as ov:
        ov.set_stream_handler(PROTOCOL, liar)
        await c.ov.connect(ov.listen_addrs()[0])
        before = await net.svc.get_balance(c.pm.address)
        with trio.fail_after(20), pytest.raises(ChannelOpenError):
            await c.pm.channel_to(ov.peer_id)
        assert await net.svc.get_balance(c.pm.address) == before  # nothing was deployed
        assert c.pm.statistics().live_channels == 0
        assert not c.pm.entries


async def test_a_payer_must_fund_what_it_announced(net: Net) -> None:
    w = await net.start("worker")
    fake = wallet_of("fake-payer")
    await net.fund(fake)
    async with open_overlay(Identity.generate(), SETTINGS) as ov:
        await ov.connect(w.ov.listen_addrs()[0])

        async def opened(announced: int) -> C.ChannelParams:
            stream = await ov.open_stream(w.peer_id, PROTOCOL)
            sent = offer(fake, deposit=announced)
            acc = await ask(stream, sent)
            assert isinstance(acc, OpenAccept)
            params = check_accept(sent, acc)
            await stream.aclose()
            return params

        # announced 1 TON, deployed nothing: refused, and no session is accepted on it
        params = await opened(TON)
        cid = params.channel_id.to_bytes(16, "big")
        assert code_of(await ask(await ov.open_stream(w.peer_id, PROTOCOL), ChannelCheck(cid))) == "mismatch"
        session = SessionOpen(os.urandom(16), b"o", cid, 10, 1000, 5, 100)
        assert code_of(await ask(await ov.open_stream(w.peer_id, PROTOCOL), session)) == "mismatch"
        # announced 1 TON, deposited 0.1 TON
        params = await opened(TON)
        assert (await ChannelOps(net.svc, fake, params).top_up(C.PARTY_A, TON // 10)).exit_code == 0
        cid = params.channel_id.to_bytes(16, "big")
        assert code_of(await ask(await ov.open_stream(w.peer_id, PROTOCOL), ChannelCheck(cid))) == "mismatch"
        # the same, honestly funded: accepted
        params = await opened(TON // 10)
        assert (await ChannelOps(net.svc, fake, params).top_up(C.PARTY_A, TON // 10)).exit_code == 0
        cid = params.channel_id.to_bytes(16, "big")
        ok = await ask(await ov.open_stream(w.peer_id, PROTOCOL), ChannelCheck(cid))
        assert isinstance(ok, ChannelChecked)
        assert (ok.status, ok.deposit_a) == ("open", TON // 10)
        # terms the payee does not accept
        for bad in (
            offer(fake, quarantine=60),
            offer(fake, deposit=1),
            offer(fake, fine=1),
            offer(fake, address="garbage"),
            offer(fake, key=w.pm.key.public),
            offer(fake, nonce=b"short"),
        ):
            assert code_of(await ask(await ov.open_stream(w.peer_id, PROTOCOL), bad)) == "refused"
    statuses = sorted(e.meta.status for e in w.pm.entries.values())
    assert statuses == ["open", "proposed", "proposed"]
    assert w.pm.statistics().live_channels == 1


class ForeignCodeChain(LocalChainService):
    """A chain backend that reports foreign code everywhere: what a compromised lite server
    could show (the real local chain cannot host other code at our channel's address)."""

    async def get_account(self, address: str) -> Any:
        info = await super().get_account(address)
        return attrs.evolve(info, code_hash=b"\x01" * 32) if info.code_hash else info


async def test_foreign_code_on_chain_is_refused_and_the_payer_gets_its_deposit_back(net: Net) -> None:
    assert isinstance(net.svc, LocalChainService)
    lying = ForeignCodeChain(net.svc.chain, net.svc.clock)
    c, w = await net.start("client"), await net.start("worker", chain=lying)
    await connect(c, w)
    before = await net.svc.get_balance(c.pm.address)
    with trio.fail_after(30):
        with pytest.raises(ChannelMismatch):
            await c.pm.channel_to(w.peer_id)
        (entry,) = c.pm.entries.values()
        assert entry.meta.status == "disputed"  # the payer started closing it at once
        await net.svc.advance_time(3601)
        await c.pm.watch_once()
    assert entry.meta.status == "closed"
    lost = before - await net.svc.get_balance(c.pm.address)
    assert 0 < lost < 50_000_000  # fees only: the whole deposit came back
    assert [e.meta.status for e in w.pm.entries.values()] == ["proposed"]


async def test_replays_forgeries_and_garbage_change_nothing(net: Net) -> None:
    c, w = await net.start("client"), await net.start("worker")
    await connect(c, w)
    sid = os.urandom(16)
    await metered(c, w, 64, session_id=sid)
    (entry,) = w.pm.entries.values()
    cid = entry.cid
    record = entry.core.r

    async def stream() -> FramedStream:
        return await c.ov.open_stream(w.peer_id, PROTOCOL)

    # a replayed SessionOpen
    replay = SessionOpen(sid, b"offer-1", cid, PRICES.prompt, PRICES.completion, PROMPT, 512)
    assert code_of(await ask(await stream(), replay)) == "duplicate_session"
    # the same OpenChannel twice: two different channels, never the same id
    same = offer(c.pm.wallet)
    first, second = await ask(await stream(), same), await ask(await stream(), same)
    assert isinstance(first, OpenAccept)
    assert isinstance(second, OpenAccept)
    assert first.channel_id != second.channel_id
    assert first.channel_address != second.channel_address
    # a proposal with a forged signature, and a validly signed one that lowers what was paid
    forged = CommitProposal(cid, 1, 0, 1, 0, 0, 0, False, b"\x07" * 64)
    assert code_of(await ask(await stream(), forged)) == "bad_signature"
    p = CommitProposal(cid, 1, 0, 1, 0, 0, 1, False, b"")
    h = C.commit_payload_hash(int.from_bytes(cid, "big"), 1, 0, 1, 0, 0, 1)
    lowered = attrs.evolve(p, signature=c.pm.key.sign(h))
    assert code_of(await ask(await stream(), lowered)) == "stale"
    # a message that cannot start a stream, garbage bytes, a frame over the size limit
    assert code_of(await ask(await stream(), Receipt(sid, 1, bytes(32), False, bytes(64)))) == "protocol"
    for raw in (b"\x05hello", uvarint(1 << 24) + b"x" * 64):
        s = await stream()
        await s.raw.write(raw)
        answer: object = None
        with trio.fail_after(10):
            try:
                answer = await s.receive()
            except StreamBroken:  # reset by the payee
                answer = None
        assert answer is None  # never answered
    # another peer naming this channel
    async with open_overlay(Identity.generate(), SETTINGS) as other:
        await other.connect(w.ov.listen_addrs()[0])
        s = await other.open_stream(w.peer_id, PROTOCOL)
        assert code_of(await ask(s, ChannelCheck(cid))) == "unknown_channel"
    # a payment inside a session with a forged state: the worker's session fails, typed
    sid2 = os.urandom(16)
    result: list[BaseException] = []

    async def worker() -> None:
        try:
            async with w.pm.serve_session(sid2) as ws:
                await ws.produced([1])
        except BadSignature as e:
            result.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(worker)
        s = await stream()
        opened = SessionOpen(sid2, b"offer-1", cid, PRICES.prompt, PRICES.completion, PROMPT, 512)
        assert isinstance(await ask(s, opened), SessionAccept)
        bogus = PayState(cid, 0, record.peer_seqno + 1, record.peer_sent + 200, b"\x09" * 64)
        await s.send(SessionPayment(sid2, 0, PRICES.cost(PROMPT, 0), bogus))
    assert len(result) == 1
    after = w.pm.entries[cid].core.r  # nothing changed on the payee's side but the last use
    assert attrs.evolve(after, last_activity=0.0) == attrs.evolve(record, last_activity=0.0)
    assert w.pm.counters["garbage"] == 2
    # the channel keeps working: the next session is paid exactly
    await metered(c, w, 32)
    assert w.pm.entries[cid].core.r.peer_sent == record.peer_sent + PRICES.cost(PROMPT, 32)
    # closed: a replayed check is refused, and the payer's next channel is a new one
    with trio.fail_after(30):
        await c.pm.close(w.peer_id)
        await w.pm.wait_for(lambda: w.pm.entries[cid].meta.status == "closed")
    assert code_of(await ask(await stream(), ChannelCheck(cid))) == "closed"
    with trio.fail_after(30):
        fresh = await c.pm.channel_to(w.peer_id)
    assert fresh.cid != cid
    assert fresh.ops.address != entry.ops.address


async def test_a_hub_session_refused_midway_keeps_its_fee_in_the_statistics(net: Net) -> None:
    """A client pays a hub session honestly for a while, then sends a payment off the session's
    prices: the proxy refuses it (typed), and what it earned and paid on the session until then
    stays in ``forward_fees`` (its earnings minus its spending, to the nanoTON)."""
    c, p, w = [await net.start(n) for n in ("client", "proxy", "worker")]
    await connect(c, p, w)
    worker_prices = Prices(prompt=8, completion=900)

    async def route(open_msg: Any, payer: str) -> Route | None:
        return Route(w.peer_id, worker_prices)

    p.pm.set_router(route)
    sid = os.urandom(16)
    send, recv = trio.open_memory_channel[list[int]](0)

    async def worker() -> None:
        async with w.pm.serve_session(sid, min_prices=worker_prices, payer=p.peer_id) as ws:
            for i in range(0, 400, 4):
                await ws.produced(list(range(i, i + 4)))
                await send.send(list(range(i, i + 4)))

    async def client() -> None:
        async with c.pm.pay_session(
            p.peer_id, session_id=sid, offer_id=b"offer-1", prices=PRICES,
            prompt_tokens=PROMPT, max_tokens=512, worker_key=w.pm.key.public,
        ) as ps:  # fmt: skip
            async for chunk in recv:
                await ps.received(chunk)
                if ps.meter.received >= 100:
                    break
            st = ps.channel.core.latest_own_state()
            assert st is not None
            wrong = SessionPayment(sid, ps.meter.paid_tokens, ps.meter.paid_amount + 1, st)
            await ps.stream.send(wrong)
            await trio.sleep_forever()  # until the proxy's refusal ends the session

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            with pytest.raises(NodeError):
                await client()
            await p.pm.wait_for(lambda: p.pm.counters["forwards_failed"] == 1)
            nursery.cancel_scope.cancel()
    stats = p.pm.statistics()
    assert stats.earned > stats.spent > 0
    assert stats.forward_fees == stats.earned - stats.spent
    assert p.pm.counters["sessions_forwarded"] == 0
