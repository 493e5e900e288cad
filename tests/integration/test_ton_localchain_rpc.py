"""The local chain served over loopback TCP: the ChainClient interface end to end, garbage and
invalid requests (typed errors, no state change, no crash), and persistence across restarts."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from overlay.errors import ChainError
from ton import contract as C
from ton.chain import ExternalRejected
from ton.keys import KeyPair
from ton.onchain import ChannelOps, WalletOps, external_message
from ton.rpc import AccountReply, AccountRequest, FundRequest, IntReply, LocalChainClient, serve_localchain
from ton.wallets import Transfer, Wallet, WalletVersion

TON = 10**9
KA, KB = KeyPair.from_seed(b"1" * 32), KeyPair.from_seed(b"2" * 32)
WA, WB = Wallet(KA, WalletVersion.V5R1), Wallet(KB, WalletVersion.V4R2)


async def start(nursery: trio.Nursery, data_dir: Path) -> LocalChainClient:
    serve = functools.partial(serve_localchain, genesis=[(WA, 100 * TON), (WB, 50 * TON)])
    host, port = await nursery.start(serve, data_dir, "127.0.0.1", 0)
    return LocalChainClient(host, port)


async def test_wallets_channel_and_epoch_seed_over_rpc(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            chain = await start(n, tmp_path)
            assert (await chain.get_account(WA.address())).status == "active"
            assert await chain.get_balance(WB.address()) > 49 * TON
            # a plain v4r2 -> v5r1 transfer
            tx = await WalletOps(chain, WB).send([Transfer(WA.address(), TON, bounce=False)])
            assert tx.success
            assert await chain.wallet_seqno(WB.address()) == 1
            # deploy and top up a channel, read it back
            params = C.ChannelParams(77, KA.public, KB.public, WA.address(), WB.address(), quarantine=60)
            ops = ChannelOps(chain, WA, params)
            assert (await ops.top_up(C.PARTY_A, 3 * TON)).exit_code == 0
            data = await chain.get_channel_state(params.address())
            assert data is not None
            assert data.deposit_a == 3 * TON
            with pytest.raises(ChainError, match="get_channel_data"):
                await chain.get_channel_state(WB.address())  # a wallet, not a channel
            # the clock and the epoch seed
            now = await chain.now()
            assert await chain.advance_time(100) >= now + 100
            seed = await chain.epoch_seed(1, epoch_seconds=60)
            assert len(seed) == 32
            assert seed == await chain.epoch_seed(1, epoch_seconds=60)
            with pytest.raises(ChainError, match="not started"):
                await chain.epoch_seed(10**9)
            await chain.aclose()
            n.cancel_scope.cancel()


async def test_garbage_and_invalid_requests_change_nothing(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            chain = await start(n, tmp_path)
            before = await chain.get_account(WA.address())
            host, port = chain.host, chain.port
            for junk in (b"\xff" * 40, b"\x05hello", b"\x00", bytes(range(256)), b"\x80\x80\x80\x80\x80\x01"):
                s = await trio.open_tcp_stream(host, port)
                await s.send_all(junk)
                with trio.move_on_after(2):
                    await s.receive_some(100)  # reset or silence, never a crash
                await s.aclose()
            # well-formed envelopes with invalid content get typed errors
            with pytest.raises(ChainError, match="bad_request"):
                await chain.get_account("not an address")
            with pytest.raises(ChainError, match="bad_request"):
                await chain._call(FundRequest(WA.address(), -5), IntReply)
            with pytest.raises(ChainError, match="bad_request"):
                await chain._call(FundRequest(WA.address(), TON, b"garbage"), IntReply)
            with pytest.raises(ChainError, match="bad_request"):
                await chain._call(IntReply(3), IntReply)  # a reply is not a request
            with pytest.raises(ChainError, match="bad_request"):
                await chain.transactions(WA.address(), 0, 10_000)
            with pytest.raises(ChainError, match="chain_error"):
                await chain.run_get_method("0:" + "00" * 32, "seqno", [])
            with pytest.raises(ChainError):
                await chain.wait_transaction(WA.address(), 10**15, 0.2)
            # the real wallet code refuses a wrong seqno and a signature by another key
            stale = WA.external_message(7, [Transfer(WB.address(), TON)], await chain.now() + 60)
            with pytest.raises(ExternalRejected):
                await chain.send_external(stale)
            impostor = Wallet(KeyPair.from_seed(b"9" * 32), WalletVersion.V5R1)
            body = impostor.transfer_body(1, [Transfer(WB.address(), TON)], await chain.now() + 60)
            forged = external_message(WA.address(), body)
            with pytest.raises(ExternalRejected):
                await chain.send_external(forged)
            # a raw frame that decodes to nothing known
            s = await trio.open_tcp_stream(host, port)
            from overlay.framing import encode_frame

            await s.send_all(encode_frame(b"\x93\x01\xcd\x01\xc5\x90", 1 << 20))  # tag 453, no fields
            with trio.move_on_after(2):
                await s.receive_some(1000)
            await s.aclose()
            after = await chain.get_account(WA.address())
            assert after == before
            reply = await chain._call(AccountRequest(WA.address()), AccountReply)  # still serving
            assert reply.balance == before.balance
            await chain.aclose()
            n.cancel_scope.cancel()


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            chain = await start(n, tmp_path)
            await WalletOps(chain, WA).send([Transfer(WB.address(), 2 * TON, bounce=False)])
            a, b = await chain.get_balance(WA.address()), await chain.get_balance(WB.address())
            now = await chain.advance_time(3600)
            await chain.aclose()
            n.cancel_scope.cancel()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            chain = await start(n, tmp_path)
            assert await chain.get_balance(WA.address()) == a
            assert await chain.get_balance(WB.address()) == b
            assert await chain.now() >= now
            assert await chain.wallet_seqno(WA.address()) == 1
            await chain.aclose()
            n.cancel_scope.cancel()
