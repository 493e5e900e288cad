"""The chain interface every backend implements: :class:`ChainClient`.

Two backends implement it with the same behaviour:

- :class:`ton.rpc.LocalChainClient`: the embedded local chain (``ton.localchain``: the real TVM
  via pytvm running the real wallet and channel code), served by one ``cocoon-node localchain``
  process to every node over loopback;
- :class:`ton.lite.LiteChainClient`: TON testnet or mainnet through pytoniq's LiteBalancer.

Higher layers (wallet transfers, channel operations, the watcher) talk only to this Protocol.
What every backend derives from get-methods (:func:`read_channel_state`, :func:`read_wallet_seqno`)
is written once here, on top of ``get_account`` and ``run_get_method``.
Addresses are raw strings ``"0:<64 hex>"``; amounts are nanoTON; times are chain unix seconds.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import attrs
from pytoniq_core.boc.cell import Cell

from overlay.errors import ChainError

from .contract import ChannelData, parse_channel_data, parse_quarantine

__all__ = [
    "EPOCH_SECONDS",
    "AccountInfo",
    "ChainClient",
    "ExternalRejected",
    "TxInfo",
    "normalize_address",
    "read_channel_state",
    "read_wallet_seqno",
]

EPOCH_SECONDS = 3600  # default length of a proxy-election epoch (seconds)


class ExternalRejected(ChainError):
    """The chain refused an external message (not accepted, bad signature, expired)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@attrs.frozen
class AccountInfo:
    address: str
    status: str  # "nonexist" | "uninit" | "active" | "frozen"
    balance: int  # nanoTON
    last_lt: int  # logical time of the last transaction (0 when none)
    code_hash: bytes | None = None  # of the deployed code, when active


@attrs.frozen
class TxInfo:
    """One transaction, as much as channel logic needs to know."""

    account: str
    lt: int
    hash: bytes
    now: int
    exit_code: int  # compute phase exit code; -1 when skipped
    success: bool  # compute and action phases succeeded
    gas_used: int
    total_fees: int  # nanoTON
    in_op: int | None  # first 32 bits of the inbound body, when present
    in_value: int  # nanoTON carried by the inbound message (0 for externals)
    external: bool  # the inbound message was external


def normalize_address(address: str) -> str:
    """Any TON address form as raw ``0:<hex>``; ChainError when it is not an address."""
    from pytoniq_core.boc.address import Address

    try:
        a = Address(address)
    except Exception as e:  # pytoniq raises a zoo of types on garbage
        raise ChainError(f"not a TON address: {address[:80]!r}") from e
    return f"{a.wc}:{a.hash_part.hex()}"


def local_epoch_seed(genesis: bytes, epoch: int) -> bytes:
    """The local chain's seed for ``epoch``: a hash chain from its random genesis seed."""
    return hashlib.sha256(b"cocoon-localchain-epoch" + genesis + epoch.to_bytes(8, "big")).digest()


class ChainClient(Protocol):
    """What ton/ needs from a chain. Every method raises ChainError (or a subclass) on failure."""

    async def now(self) -> int:
        """The chain's current unix time (the local chain has its own clock)."""
        ...

    async def get_account(self, address: str) -> AccountInfo: ...

    async def get_balance(self, address: str) -> int: ...

    async def send_external(self, message: Cell) -> bytes:
        """Send a serialized external message; returns its hash. ExternalRejected if refused."""
        ...

    async def run_get_method(self, address: str, method: str, stack: list[Any]) -> list[Any]: ...

    async def get_channel_state(self, address: str) -> ChannelData | None:
        """The channel contract's data at ``address``, or None when not deployed."""
        ...

    async def wallet_seqno(self, address: str) -> int:
        """A wallet's seqno (0 when not deployed)."""
        ...

    async def transactions(self, address: str, after_lt: int = 0, limit: int = 64) -> list[TxInfo]:
        """Transactions of ``address`` with lt > ``after_lt``, oldest first."""
        ...

    async def wait_transaction(self, address: str, after_lt: int, timeout: float) -> TxInfo:
        """The first transaction of ``address`` with lt > ``after_lt``; ChainError on timeout."""
        ...

    async def epoch_seed(self, epoch: int, *, epoch_seconds: int = EPOCH_SECONDS) -> bytes:
        """32 bytes fixed by the chain for ``epoch`` (proxy election); only for started epochs."""
        ...


class _GetMethods(Protocol):
    async def get_account(self, address: str) -> AccountInfo: ...

    async def run_get_method(self, address: str, method: str, stack: list[Any]) -> list[Any]: ...


async def read_channel_state(chain: _GetMethods, address: str) -> ChannelData | None:
    """``get_channel_state`` of every backend: the channel's data and quarantine, None when the
    account is not active; ChainError when the contract there is not a channel."""
    if (await chain.get_account(address)).status != "active":
        return None
    try:
        data = parse_channel_data(await chain.run_get_method(address, "get_channel_data", []))
        q = parse_quarantine(await chain.run_get_method(address, "get_quarantine", []))
    except ValueError as e:
        raise ChainError(f"{address} is not a channel: {e}") from e
    return attrs.evolve(data, quarantine=q)


async def read_wallet_seqno(chain: _GetMethods, address: str) -> int:
    """``wallet_seqno`` of every backend: 0 when the wallet is not deployed."""
    if (await chain.get_account(address)).status != "active":
        return 0
    out = await chain.run_get_method(address, "seqno", [])
    if not out or not isinstance(out[0], int):
        raise ChainError("seqno get-method returned no integer")
    return int(out[0])
