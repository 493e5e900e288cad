"""The real (lite-server) backend against a FAKE lite-client transport.

TON testnet/mainnet cannot be reached here, so the provider below answers LiteBalancer's calls
with responses taken from the local chain: real account cells, real transaction cells and real
get-method stacks produced by the TVM. The backend code (asyncio bridge, parsing, waits, the
epoch seed) is the real one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from pytoniq_core.tl.block import BlockIdExt
from pytoniq_core.tlb.account import ShardAccount
from pytoniq_core.tlb.transaction import Transaction

from overlay.errors import ChainError, ConfigError
from ton import contract as C
from ton.chain import ExternalRejected
from ton.keys import KeyPair
from ton.lite import LiteChainClient, asyncio_runner, open_lite_chain
from ton.localchain import LocalChain
from ton.onchain import ChannelOps, WalletOps
from ton.wallets import Transfer, Wallet

TON = 10**9
NOW = 1_800_000_000
KA, KB = KeyPair.from_seed(b"L" * 32), KeyPair.from_seed(b"M" * 32)


class FakeLiteServer:
    """A fake of pytoniq's LiteBalancer, answering from a LocalChain (asyncio methods)."""

    def __init__(self) -> None:
        self.chain = LocalChain()
        self.calls: list[str] = []

    async def get_time(self) -> dict[str, int]:
        self.calls.append("get_time")
        return {"now": NOW}

    async def raw_get_account_state(self, address: Address) -> tuple[Any, Any]:
        self.calls.append("raw_get_account_state")
        cell = self.chain.accounts.get(f"{address.wc}:{address.hash_part.hex()}")
        if cell is None:
            return None, None
        sa = ShardAccount.deserialize(cell.begin_parse())
        return sa.account, sa

    async def run_get_method(self, address: Address, method: str, stack: list[Any]) -> list[Any]:
        self.calls.append("run_get_method")
        code, out = self.chain.run_get_method(f"{address.wc}:{address.hash_part.hex()}", method, stack, NOW)
        if code != 0:
            raise RuntimeError(f"get method exit code {code}")  # what pytoniq raises, roughly
        return out

    async def raw_send_message(self, message: bytes) -> None:
        self.calls.append("raw_send_message")
        self.chain.send_external(Cell.one_from_boc(message), NOW)

    async def get_transactions(self, address: Address, count: int) -> list[Any]:
        self.calls.append("get_transactions")
        cells = self.chain.tx_cells.get(f"{address.wc}:{address.hash_part.hex()}", [])
        return [Transaction.deserialize(c.begin_parse()) for c in reversed(cells[-count:])]  # newest first

    async def lookup_block(
        self, wc: int, shard: int, seqno: int = -1, lt: Any = None, utime: Any = None
    ) -> Any:
        self.calls.append("lookup_block")
        root = hashlib.sha256(f"block at {utime}".encode()).digest()
        return BlockIdExt(wc, shard, 1000 + int(utime) // 5, root, b"\0" * 32), None


async def test_lite_backend_runs_wallet_and_channel_operations() -> None:
    fake = FakeLiteServer()
    wa, wb = Wallet(KA), Wallet(KB)
    for w in (wa, wb):
        fake.chain.mint(w.address(), 10 * TON, NOW, state_init=w.state_init())
    with trio.fail_after(30):
        async with asyncio_runner() as runner:
            chain = LiteChainClient(fake, runner, poll=0.01)
            assert await chain.now() == NOW
            info = await chain.get_account(wa.address())
            assert info.status == "active"
            assert info.balance > 9 * TON
            assert (await chain.get_account("0:" + "11" * 32)).status == "nonexist"
            tx = await WalletOps(chain, wa).send([Transfer(wb.address(), TON, bounce=False)])
            assert tx.success
            assert await chain.wallet_seqno(wa.address()) == 1
            params = C.ChannelParams(3, KA.public, KB.public, wa.address(), wb.address(), quarantine=60)
            ops = ChannelOps(chain, wa, params)
            tx = await ops.top_up(C.PARTY_A, 2 * TON)
            assert tx.exit_code == 0
            assert tx.in_op == C.Op.TOP_UP
            data = await chain.get_channel_state(params.address())
            assert data is not None
            assert data.deposit_a == 2 * TON
            with pytest.raises(ExternalRejected):
                await chain.send_external(wa.external_message(9, [Transfer(wb.address(), 1)], NOW + 60))
            with pytest.raises(ChainError):
                await chain.run_get_method(wa.address(), "no_such_method", [])
            with pytest.raises(ChainError):
                await chain.wait_transaction(wb.address(), 10**15, 0.05)
            s1 = await chain.epoch_seed(5, epoch_seconds=3600)
            assert s1 == await chain.epoch_seed(5, epoch_seconds=3600)
            assert s1 != await chain.epoch_seed(6, epoch_seconds=3600)
            with pytest.raises(ChainError, match="not started"):
                await chain.epoch_seed(NOW)
    assert "lookup_block" in fake.calls


async def test_open_lite_chain_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "global.config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError):
        async with open_lite_chain(bad):
            pass
    with pytest.raises(ConfigError):
        async with open_lite_chain(tmp_path / "missing.json"):
            pass
