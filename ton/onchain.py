"""On-chain operations over any :class:`~ton.chain.ChainClient`: wallet transfers and the
channel contract's messages (deploy + top-up, cooperative commit/close, uncooperative close,
challenge, finish). Each returns the channel's transaction (its exit code is the contract's
verdict), waiting for it on the chain with a bounded timeout.

A wallet's transfers must not overlap (each needs the next seqno): every :class:`WalletOps`
of one wallet shares one ``trio.Lock`` (pass ``lock=``; :class:`ChannelOps` passes it on).
"""

from __future__ import annotations

import logging

import trio
from pytoniq.contract.contract import Contract
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from overlay.errors import ChainError

from . import contract as C
from .chain import ChainClient, TxInfo
from .keys import KeyPair
from .wallets import Transfer, Wallet

__all__ = ["ChannelOps", "WalletOps", "external_message", "OP_GAS"]

log = logging.getLogger(__name__)

OP_GAS = 50_000_000  # nanoTON sent along an internal channel operation to pay its gas (0.05 TON)
VALID_FOR = 120  # seconds a wallet transfer stays valid


def external_message(dest: str, body: Cell) -> Cell:
    msg = Contract.create_external_msg(dest=Address(dest), body=body)
    cell: Cell = msg.serialize()
    return cell


class WalletOps:
    """Signed transfers from one wallet."""

    def __init__(
        self, chain: ChainClient, wallet: Wallet, *, timeout: float = 60.0, lock: trio.Lock | None = None
    ) -> None:
        self.chain = chain
        self.wallet = wallet
        self.address = wallet.address()
        self.timeout = timeout
        self.lock = lock or trio.Lock()

    async def send(self, transfers: list[Transfer]) -> TxInfo:
        """Send ``transfers`` in one external message; returns the wallet's transaction."""
        async with self.lock:
            return await self._send(transfers)

    async def _send(self, transfers: list[Transfer]) -> TxInfo:
        info = await self.chain.get_account(self.address)
        seqno = await self.chain.wallet_seqno(self.address) if info.status == "active" else 0
        now = await self.chain.now()
        msg = self.wallet.external_message(seqno, transfers, now + VALID_FOR, deploy=info.status != "active")
        await self.chain.send_external(msg)
        tx = await self.chain.wait_transaction(self.address, info.last_lt, self.timeout)
        if not tx.success:
            raise ChainError(f"wallet transfer failed with exit code {tx.exit_code}")
        return tx


class ChannelOps:
    """The channel contract's operations, as one party (its wallet pays gas and deposits)."""

    def __init__(
        self,
        chain: ChainClient,
        wallet: Wallet,
        params: C.ChannelParams,
        *,
        timeout: float = 60.0,
        lock: trio.Lock | None = None,
    ):
        self.chain = chain
        self.wallet = WalletOps(chain, wallet, timeout=timeout, lock=lock)
        self.params = params
        self.address = params.address()
        self.timeout = timeout

    async def _last_lt(self) -> int:
        return (await self.chain.get_account(self.address)).last_lt

    async def _via_wallet(self, body: Cell, value: int, *, deploy: bool = False) -> TxInfo:
        async with self.wallet.lock:  # one wallet operation at a time, through to the channel's tx
            before = await self._last_lt()
            si = self.params.state_init() if deploy else None
            await self.wallet._send([Transfer(self.address, value, body, si, bounce=not deploy)])
            return await self.chain.wait_transaction(self.address, before, self.timeout)

    async def top_up(self, party: int, amount: int) -> TxInfo:
        """Deposit ``amount`` for ``party``; deploys the channel on its first top-up."""
        info = await self.chain.get_account(self.address)
        deploy = info.status != "active"
        return await self._via_wallet(
            C.top_up_body(party, amount), amount + C.TOP_UP_GAS_RESERVE, deploy=deploy
        )

    async def submit(self, body: Cell, *, via_wallet: bool = False) -> TxInfo:
        """A cooperative commit/close or a finish: as an external message (the contract pays gas
        after every check passed), or from our wallet (exit codes visible even on refusal)."""
        if via_wallet:
            return await self._via_wallet(body, OP_GAS)
        before = await self._last_lt()
        await self.chain.send_external(external_message(self.address, body))
        return await self.chain.wait_transaction(self.address, before, self.timeout)

    async def start_uncooperative_close(
        self, key: KeyPair, state_a: Cell | None, state_b: Cell | None
    ) -> TxInfo:
        by_a = key.public == self.params.key_a
        body = C.uncoop_body(key, by_a, self.params.channel_id, state_a, state_b)
        return await self._via_wallet(body, OP_GAS)

    async def challenge(self, key: KeyPair, state_a: Cell | None, state_b: Cell | None) -> TxInfo:
        by_a = key.public == self.params.key_a
        body = C.challenge_body(key, by_a, self.params.channel_id, state_a, state_b)
        return await self._via_wallet(body, OP_GAS)

    async def finish(self, *, via_wallet: bool = False) -> TxInfo:
        return await self.submit(C.finish_body(), via_wallet=via_wallet)

    async def data(self) -> C.ChannelData | None:
        return await self.chain.get_channel_state(self.address)
