"""The local chain as an in-process :class:`~ton.chain.ChainClient` (trio).

:class:`LocalChainService` owns a :class:`~ton.localchain.LocalChain` and serves the ChainClient
methods plus the devnet-only ``fund`` (faucet) and ``advance_time``. The RPC server (``ton.rpc``)
puts it on a loopback socket; tests use it directly. ``wait_transaction`` blocks on a trio event
that every new transaction sets, so waits never poll a clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio
from pytoniq_core.boc.cell import Cell
from pytoniq_core.tlb.account import StateInit

from overlay.errors import ChainError

from .chain import (
    EPOCH_SECONDS,
    AccountInfo,
    TxInfo,
    normalize_address,
    read_channel_state,
    read_wallet_seqno,
)
from .contract import ChannelData
from .localchain import LocalChain

__all__ = ["LocalChainService", "MAX_FUND"]

MAX_FUND = 10_000 * 10**9  # nanoTON the faucet gives in one call


class LocalChainService:
    """ChainClient over a LocalChain in this process."""

    def __init__(self, chain: LocalChain, clock: Callable[[], float] = time.time) -> None:
        self.chain = chain
        self.clock = clock
        self._changed = trio.Event()
        self._lock = trio.Lock()

    def _now(self) -> int:
        return self.chain.now(self.clock())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def now(self) -> int:
        return self._now()

    async def get_account(self, address: str) -> AccountInfo:
        return self.chain.account(address)

    async def get_balance(self, address: str) -> int:
        return self.chain.account(address).balance

    async def send_external(self, message: Cell) -> bytes:
        await self.send_external_traced(message)
        h: bytes = message.hash
        return h

    async def send_external_traced(self, message: Cell) -> list[TxInfo]:
        """Like send_external, returning every transaction of the trace (local chain only)."""
        async with self._lock:
            try:
                txs = self.chain.send_external(message, self._now())
            finally:
                self._notify()
        return txs

    async def fund(self, address: str, amount: int, state_init: StateInit | None = None) -> list[TxInfo]:
        """Faucet: mint ``amount`` to ``address`` (deploying ``state_init`` when given)."""
        if not 0 < amount <= MAX_FUND:
            raise ChainError(f"fund amount must be in (0, {MAX_FUND}]")
        async with self._lock:
            txs = self.chain.mint(address, amount, self._now(), state_init=state_init)
            self._notify()
        return txs

    async def advance_time(self, seconds: int) -> int:
        if not 0 <= seconds <= 10 * 365 * 86400:
            raise ChainError("advance between 0 and 10 years")
        async with self._lock:
            now = self.chain.advance(seconds, self.clock())
        return now

    async def run_get_method(self, address: str, method: str, stack: list[Any]) -> list[Any]:
        code, out = self.chain.run_get_method(address, method, stack, self._now())
        if code not in (0, 1):
            raise ChainError(f"get-method {method} exited with {code}")
        return out

    async def get_channel_state(self, address: str) -> ChannelData | None:
        return await read_channel_state(self, address)

    async def wallet_seqno(self, address: str) -> int:
        return await read_wallet_seqno(self, address)

    async def transactions(self, address: str, after_lt: int = 0, limit: int = 64) -> list[TxInfo]:
        return self.chain.transactions(address, after_lt, limit)

    async def wait_transaction(self, address: str, after_lt: int, timeout: float) -> TxInfo:
        addr = normalize_address(address)
        with trio.move_on_after(timeout):
            while True:
                txs = self.chain.transactions(addr, after_lt, 1)
                if txs:
                    return txs[0]
                await self._changed.wait()
        raise ChainError(f"no transaction on {addr} after lt {after_lt} within {timeout} s")

    async def epoch_seed(self, epoch: int, *, epoch_seconds: int = EPOCH_SECONDS) -> bytes:
        if epoch < 0 or epoch_seconds <= 0:
            raise ChainError("epoch and epoch_seconds must be positive")
        if epoch * epoch_seconds > self._now():
            raise ChainError(f"epoch {epoch} has not started")
        return self.chain.epoch_seed(epoch)
