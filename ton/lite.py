"""The real backend: TON testnet or mainnet through pytoniq's LiteBalancer.

pytoniq speaks asyncio; the node runs on trio. :func:`asyncio_runner` runs one asyncio event
loop in a trio worker thread for the client's lifetime, and :class:`LiteChainClient` submits
each lite-server call to it and awaits the result from trio. The provider is anything with
LiteBalancer's methods (``raw_get_account_state``, ``run_get_method``, ``raw_send_message``,
``get_transactions``, ``get_time``, ``lookup_block``), so tests plug in a fake transport that
answers with real recorded/constructed cells.

Usage::

    async with open_lite_chain(Path("testnet-global.config.json")) as chain:
        print(await chain.get_balance(address))

The epoch seed of epoch ``e`` is derived from the root hash of the first masterchain block at
or after ``e * epoch_seconds``: fixed by the chain, unknown before that time.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from overlay.errors import ChainError, ConfigError

from .chain import (
    EPOCH_SECONDS,
    AccountInfo,
    ExternalRejected,
    TxInfo,
    normalize_address,
    read_channel_state,
    read_wallet_seqno,
)
from .contract import ChannelData

__all__ = [
    "AsyncioRunner",
    "LiteChainClient",
    "asyncio_runner",
    "open_lite_chain",
    "tx_info_from_transaction",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
MASTERCHAIN_SHARD = -(2**63)
POLL = 1.0  # seconds between transaction polls on the real chain


class AsyncioRunner:
    """Runs coroutines on one asyncio loop living in a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def call(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        async def wrapped() -> _T:
            return await fn(*args, **kwargs)

        fut = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        try:
            return await trio.to_thread.run_sync(fut.result, abandon_on_cancel=True)
        except trio.Cancelled:
            fut.cancel()
            raise


@asynccontextmanager
async def asyncio_runner() -> AsyncIterator[AsyncioRunner]:
    loop = asyncio.new_event_loop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(trio.to_thread.run_sync, loop.run_forever, abandon_on_cancel=True)
        )
        try:
            yield AsyncioRunner(loop)
        finally:
            loop.call_soon_threadsafe(loop.stop)
    loop.close()


class LiteProvider(Protocol):
    """The part of pytoniq's LiteBalancer this backend uses."""

    async def raw_get_account_state(self, address: Address) -> tuple[Any, Any]: ...

    async def run_get_method(self, address: Address, method: str, stack: list[Any]) -> list[Any]: ...

    async def raw_send_message(self, message: bytes) -> Any: ...

    async def get_transactions(self, address: Address, count: int) -> list[Any]: ...

    async def get_time(self) -> Any: ...

    async def lookup_block(
        self, wc: int, shard: int, seqno: int = -1, lt: Any = None, utime: Any = None
    ) -> Any: ...


def tx_info_from_transaction(account: str, tx: Any) -> TxInfo:
    """A pytoniq Transaction as our TxInfo."""
    descr = tx.description
    compute = getattr(descr, "compute_ph", None)
    if compute is not None and getattr(compute, "type_", "") == "vm":
        exit_code, gas, ok = int(compute.exit_code), int(compute.gas_used), bool(compute.success)
    else:
        exit_code, gas, ok = -1, 0, False
    action = getattr(descr, "action", None)
    if action is not None:
        ok = ok and bool(action.success)
    in_op, value, external = None, 0, False
    if tx.in_msg is not None:
        external = tx.in_msg.is_external
        body = tx.in_msg.body.begin_parse()
        in_op = body.load_uint(32) if body.remaining_bits >= 32 else None
        if tx.in_msg.is_internal:
            value = int(tx.in_msg.info.value.grams)
    return TxInfo(
        account=account, lt=int(tx.lt), hash=tx.cell.hash, now=int(tx.now), exit_code=exit_code,
        success=ok and not bool(getattr(descr, "aborted", False)), gas_used=gas,
        total_fees=int(tx.total_fees.grams), in_op=in_op, in_value=value, external=external,
    )  # fmt: skip


class LiteChainClient:
    """ChainClient over a LiteBalancer (or a fake of it) running on an asyncio runner."""

    def __init__(self, provider: LiteProvider, runner: AsyncioRunner, *, poll: float = POLL) -> None:
        self.provider = provider
        self.runner = runner
        self.poll = poll

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.provider, name)
        try:
            return await self.runner.call(fn, *args, **kwargs)
        except (ChainError, trio.Cancelled):
            raise
        except Exception as e:  # lite-server and ADNL errors come in many types
            raise ChainError(f"lite server {name}: {type(e).__name__}: {e}") from e

    async def now(self) -> int:
        res = await self._call("get_time")
        return int(res["now"] if isinstance(res, dict) else res)

    async def get_account(self, address: str) -> AccountInfo:
        addr = normalize_address(address)
        account, shard_account = await self._call("raw_get_account_state", Address(addr))
        if account is None:
            return AccountInfo(addr, "nonexist", 0, 0)
        state = account.storage.state
        status = {"account_active": "active", "account_uninit": "uninit", "account_frozen": "frozen"}.get(
            state.type_, "nonexist"
        )
        code_hash = state.state_init.code.hash if status == "active" and state.state_init.code else None
        last_lt = int(shard_account.last_trans_lt) if shard_account is not None else 0
        return AccountInfo(addr, status, int(account.storage.balance.grams), last_lt, code_hash)

    async def get_balance(self, address: str) -> int:
        return (await self.get_account(address)).balance

    async def send_external(self, message: Cell) -> bytes:
        try:
            await self._call("raw_send_message", message.to_boc())
        except ChainError as e:
            raise ExternalRejected(str(e)) from e
        return bytes(message.hash)

    async def run_get_method(self, address: str, method: str, stack: list[Any]) -> list[Any]:
        return list(await self._call("run_get_method", Address(normalize_address(address)), method, stack))

    async def get_channel_state(self, address: str) -> ChannelData | None:
        return await read_channel_state(self, address)

    async def wallet_seqno(self, address: str) -> int:
        return await read_wallet_seqno(self, address)

    async def transactions(self, address: str, after_lt: int = 0, limit: int = 64) -> list[TxInfo]:
        addr = normalize_address(address)
        txs = await self._call("get_transactions", Address(addr), min(max(limit, 1), 256))
        infos = [tx_info_from_transaction(addr, t) for t in txs]
        return sorted((t for t in infos if t.lt > after_lt), key=lambda t: t.lt)[:limit]

    async def wait_transaction(self, address: str, after_lt: int, timeout: float) -> TxInfo:
        with trio.move_on_after(timeout):
            while True:
                txs = await self.transactions(address, after_lt, 16)
                if txs:
                    return txs[0]
                await trio.sleep(self.poll)
        raise ChainError(f"no transaction on {address} after lt {after_lt} within {timeout} s")

    async def epoch_seed(self, epoch: int, *, epoch_seconds: int = EPOCH_SECONDS) -> bytes:
        start = epoch * epoch_seconds
        if epoch < 0 or epoch_seconds <= 0 or start > await self.now():
            raise ChainError(f"epoch {epoch} has not started")
        block, _ = await self._call("lookup_block", -1, MASTERCHAIN_SHARD, utime=start)
        return hashlib.sha256(b"cocoon-ton-epoch" + block.root_hash + epoch.to_bytes(8, "big")).digest()


@asynccontextmanager
async def open_lite_chain(global_config: Path, *, trust_level: int = 2) -> AsyncIterator[LiteChainClient]:
    """Connect to the network described by a TON global config file (testnet or mainnet)."""
    try:
        config = json.loads(await trio.Path(global_config).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{global_config}: cannot read a TON global config ({e})") from e
    from pytoniq.liteclient.balancer import LiteBalancer

    async with asyncio_runner() as runner:
        balancer = LiteBalancer.from_config(config, trust_level=trust_level)
        try:
            await runner.call(balancer.start_up)
        except Exception as e:
            raise ChainError(f"cannot reach any lite server of {global_config}: {e}") from e
        try:
            yield LiteChainClient(balancer, runner)
        finally:
            with trio.CancelScope(shield=True):
                await runner.call(balancer.close_all)
