"""Wallets: addresses and signed transfers of the standard TON wallets v4r2 and v5r1, offline.

The wallet code cells and the transfer layouts come from pytoniq 0.1.43 (its static builders
need no network); this module binds them to our :class:`~ton.keys.KeyPair` and returns ready
external messages (cells) that any chain backend sends. Seqnos and ``valid_until`` are the
caller's: they come from the chain (``ChainClient.wallet_seqno`` / ``now``), never from the
local clock.
"""

from __future__ import annotations

import enum
from pathlib import Path

import attrs
from pytoniq.contract.contract import Contract
from pytoniq.contract.wallets.wallet import WALLET_V4_R2_CODE, WalletV4
from pytoniq.contract.wallets.wallet_v5 import WALLET_V5_R1_CODE, WalletV5R1
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from pytoniq_core.tlb.account import StateInit
from pytoniq_core.tlb.custom.wallet import WalletMessage

from .keys import KeyPair, keypair_from_mnemonic, load_or_create_mnemonic

__all__ = [
    "MAINNET_GLOBAL_ID",
    "TESTNET_GLOBAL_ID",
    "Transfer",
    "Wallet",
    "WalletVersion",
    "internal_message",
    "wallet_from_data_dir",
]

MAINNET_GLOBAL_ID = -239
TESTNET_GLOBAL_ID = -3
SEND_MODE_PAY_FEES_SEPARATELY = 1
SEND_MODE_IGNORE_ERRORS = 2


class WalletVersion(enum.StrEnum):
    V4R2 = "v4r2"
    V5R1 = "v5r1"


@attrs.frozen
class Transfer:
    """One outgoing message of a wallet transfer."""

    dest: str  # address, raw or user-friendly
    amount: int  # nanoTON
    body: Cell | None = None
    state_init: StateInit | None = None
    bounce: bool = True
    mode: int = SEND_MODE_PAY_FEES_SEPARATELY | SEND_MODE_IGNORE_ERRORS


def internal_message(
    dest: str,
    amount: int,
    body: Cell | None = None,
    state_init: StateInit | None = None,
    *,
    bounce: bool = True,
    src: str | None = None,
) -> Cell:
    """A serialized internal message (used by wallets, and by the local chain's faucet)."""
    msg = Contract.create_internal_msg(
        src=Address(src) if src else None,
        dest=Address(dest),
        value=amount,
        body=body,
        state_init=state_init,
        bounce=bounce,
    )
    cell: Cell = msg.serialize()
    return cell


@attrs.frozen
class Wallet:
    """A standard wallet of ``keys`` (subwallet 0, basechain)."""

    keys: KeyPair
    version: WalletVersion = WalletVersion.V5R1
    network_global_id: int = MAINNET_GLOBAL_ID  # -239 mainnet (and the local chain), -3 testnet

    @property
    def wallet_id(self) -> int:
        if self.version is WalletVersion.V4R2:
            return 698983191
        data = WalletV5R1.create_data_cell(self.keys.public, wc=0, network_global_id=self.network_global_id)
        s = data.begin_parse()
        s.skip_bits(1 + 32)
        wid: int = s.load_uint(32)
        return wid

    def code(self) -> Cell:
        code: Cell = WALLET_V4_R2_CODE if self.version is WalletVersion.V4R2 else WALLET_V5_R1_CODE
        return code

    def data_cell(self) -> Cell:
        if self.version is WalletVersion.V4R2:
            cell: Cell = WalletV4.create_data_cell(self.keys.public, 698983191, 0)
        else:
            cell = WalletV5R1.create_data_cell(
                self.keys.public, wc=0, network_global_id=self.network_global_id
            )
        return cell

    def state_init(self) -> StateInit:
        return StateInit(code=self.code(), data=self.data_cell())

    def address(self) -> str:
        """Raw address ``0:<hex>``."""
        return f"0:{self.state_init().serialize().hash.hex()}"

    def friendly_address(self, *, testnet: bool = False) -> str:
        addr: str = Address(self.address()).to_str(is_bounceable=False, is_test_only=testnet)
        return addr

    def transfer_body(self, seqno: int, transfers: list[Transfer], valid_until: int) -> Cell:
        """The signed body of an external transfer message."""
        msgs = [
            WalletMessage(
                send_mode=t.mode,
                message=Contract.create_internal_msg(
                    dest=Address(t.dest),
                    value=t.amount,
                    body=t.body,
                    state_init=t.state_init,
                    bounce=t.bounce,
                ),
            )
            for t in transfers
        ]
        if self.version is WalletVersion.V4R2:
            body: Cell = WalletV4.raw_create_transfer_msg(
                self.keys.private64, seqno, self.wallet_id, msgs, valid_until=valid_until
            )
        else:
            body = WalletV5R1.raw_create_transfer_msg(
                WalletV5R1,  # its `self` is only used for a classmethod
                self.keys.private64,
                seqno,
                self.wallet_id,
                msgs,
                valid_until=valid_until,
            )
        return body

    def external_message(
        self, seqno: int, transfers: list[Transfer], valid_until: int, *, deploy: bool = False
    ) -> Cell:
        """A complete external message; ``deploy`` attaches the StateInit (first transfer)."""
        msg = Contract.create_external_msg(
            dest=Address(self.address()),
            state_init=self.state_init() if deploy else None,
            body=self.transfer_body(seqno, transfers, valid_until),
        )
        cell: Cell = msg.serialize()
        return cell


def wallet_from_data_dir(
    data_dir: Path,
    version: WalletVersion = WalletVersion.V5R1,
    network_global_id: int = MAINNET_GLOBAL_ID,
) -> Wallet:
    """The node's wallet: its mnemonic lives in ``data_dir/wallet.mnemonic`` (created, 0600)."""
    words = load_or_create_mnemonic(data_dir / "wallet.mnemonic")
    return Wallet(keypair_from_mnemonic(words), version, network_global_id)
