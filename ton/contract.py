"""The channel contract from Python: code, addresses, message bodies, signed payloads, exit codes.

The contract source is ``ton/contract/channel.tolk``; its compiled code ``channel.boc`` is
committed beside it (rebuild with ``cd ton/contract && npm ci && node build.js``). This module
mirrors its layouts: anything built here is exactly what the contract parses.

Signed payloads are plain cells without references, so their representation hash is computed
here directly (``sha256(d1 d2 data)``) without building a pytoniq cell: that keeps signing and
verifying a state at a few tens of microseconds. A test checks the shortcut against pytoniq.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from pathlib import Path
from typing import Any

import attrs
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell
from pytoniq_core.tlb.account import StateInit

from .keys import KeyPair

__all__ = [
    "CODE_PATH",
    "PARTY_A",
    "PARTY_B",
    "TOP_UP_GAS_RESERVE",
    "ChannelData",
    "ChannelParams",
    "ExitCode",
    "Op",
    "Quarantine",
    "Status",
    "Tag",
    "challenge_body",
    "channel_code",
    "close_payload_hash",
    "commit_payload_hash",
    "coop_close_body",
    "coop_commit_body",
    "finish_body",
    "parse_channel_data",
    "parse_quarantine",
    "signed_state_cell",
    "state_hash",
    "top_up_body",
    "uncoop_body",
]

CODE_PATH = Path(__file__).parent / "contract" / "channel.boc"
PARTY_A = 0
PARTY_B = 1
TOP_UP_GAS_RESERVE = 10_000_000  # nanoTON each top-up carries above the credited amount


class Op(enum.IntEnum):
    TOP_UP = 0xDD63BAF6
    COOP_COMMIT = 0x2EFDE501
    COOP_CLOSE = 0x8A44F85B
    START_UNCOOP = 0xF824B267
    CHALLENGE = 0x5AA0B866
    FINISH = 0x8D9C82C7
    CLOSED_PAYOUT = 0xF9B60C21
    WITHDRAWN = 0xE2A3F2F9


class Tag(enum.IntEnum):
    STATE = 0x43635374  # 'CcSt'
    COMMIT = 0x4363436D  # 'CcCm'
    CLOSE = 0x4363436C  # 'CcCl'
    UNCOOP = 0x43635563  # 'CcUc'
    CHALLENGE = 0x43634368  # 'CcCh'


class Status(enum.IntEnum):
    OPEN = 0
    QUARANTINE = 1
    CLOSED = 2


class ExitCode(enum.IntEnum):
    """The contract's exit codes (``ERR_*`` in channel.tolk)."""

    OK = 0
    WRONG_STATUS = 100
    BAD_SIGNATURE_A = 101
    BAD_SIGNATURE_B = 102
    WRONG_CHANNEL = 103
    WRONG_TAG = 104
    OLD_SEQNO = 105
    SENT_DECREASED = 106
    OVERDRAFT = 107
    NOT_ENOUGH_VALUE = 108
    NOT_ALLOWED = 110
    TOO_LATE = 111
    TOO_EARLY = 112
    ALREADY_CHALLENGED = 113
    NOTHING_NEW = 114
    UNKNOWN_OP = 0xFFFF


@functools.cache
def channel_code() -> Cell:
    """The compiled channel contract (committed ``channel.boc``)."""
    return Cell.one_from_boc(CODE_PATH.read_bytes())


# --------------------------------------------------------------------------- fast cell hashes


class _Bits:
    """A bit string for a reference-free cell, hashed like TVM does."""

    __slots__ = ("acc", "n")

    def __init__(self) -> None:
        self.acc = 0
        self.n = 0

    def uint(self, value: int, bits: int) -> _Bits:
        if value < 0 or value >> bits:
            raise ValueError(f"{value} does not fit in {bits} bits")
        self.acc = (self.acc << bits) | value
        self.n += bits
        return self

    def coins(self, value: int) -> _Bits:
        length = (value.bit_length() + 7) // 8
        if length > 15:
            raise ValueError("amount does not fit in Coins")
        self.uint(length, 4)
        return self.uint(value, 8 * length)

    def hash(self) -> bytes:
        n, acc = self.n, self.acc
        if n > 1023:
            raise ValueError("cell overflow")
        full, rem = divmod(n, 8)
        if rem:
            pad = 8 - rem
            acc = (acc << pad) | (1 << (pad - 1))
            data = acc.to_bytes(full + 1, "big")
        else:
            data = acc.to_bytes(full, "big") if full else b""
        d2 = full * 2 + (1 if rem else 0)
        return hashlib.sha256(bytes((0, d2)) + data).digest()


def _state_bits(channel_id: int, party: int, seqno: int, sent: int) -> _Bits:
    return _Bits().uint(Tag.STATE, 32).uint(channel_id, 128).uint(party, 1).uint(seqno, 64).coins(sent)


def state_hash(channel_id: int, party: int, seqno: int, sent: int) -> bytes:
    """The hash a party signs for its cumulative outgoing state."""
    return _state_bits(channel_id, party, seqno, sent).hash()


def commit_payload_hash(
    channel_id: int, seqno_a: int, seqno_b: int, sent_a: int, sent_b: int, withdraw_a: int, withdraw_b: int
) -> bytes:
    return _commit_bits(channel_id, seqno_a, seqno_b, sent_a, sent_b, withdraw_a, withdraw_b).hash()


def close_payload_hash(channel_id: int, seqno_a: int, seqno_b: int, sent_a: int, sent_b: int) -> bytes:
    return _close_bits(channel_id, seqno_a, seqno_b, sent_a, sent_b).hash()


def _commit_bits(
    channel_id: int, seqno_a: int, seqno_b: int, sent_a: int, sent_b: int, withdraw_a: int, withdraw_b: int
) -> _Bits:
    return (
        _Bits()
        .uint(Tag.COMMIT, 32)
        .uint(channel_id, 128)
        .uint(seqno_a, 64)
        .uint(seqno_b, 64)
        .coins(sent_a)
        .coins(sent_b)
        .coins(withdraw_a)
        .coins(withdraw_b)
    )


def _close_bits(channel_id: int, seqno_a: int, seqno_b: int, sent_a: int, sent_b: int) -> _Bits:
    return (
        _Bits()
        .uint(Tag.CLOSE, 32)
        .uint(channel_id, 128)
        .uint(seqno_a, 64)
        .uint(seqno_b, 64)
        .coins(sent_a)
        .coins(sent_b)
    )


def _to_cell(bits: _Bits) -> Cell:
    b = Builder()
    if bits.n:
        b.store_uint(bits.acc, bits.n)
    return b.end_cell()


# --------------------------------------------------------------------------- channel params


@attrs.frozen
class ChannelParams:
    """Everything that fixes a channel's address: both parties derive it independently."""

    channel_id: int  # uint128, unique per channel
    key_a: bytes  # Ed25519 public key of A (the payer)
    key_b: bytes  # Ed25519 public key of B (the payee)
    addr_a: str  # payout address of A (raw "0:hex" or user-friendly)
    addr_b: str  # payout address of B
    quarantine: int = 6 * 3600  # seconds between an uncooperative close and its finish
    fine: int = 1_000_000_000  # nanoTON taken from an initiator caught with a stale state

    def data_cell(self) -> Cell:
        keys = Builder().store_bytes(self.key_a).store_bytes(self.key_b).end_cell()
        params = (
            Builder()
            .store_uint(self.quarantine, 32)
            .store_coins(self.fine)
            .store_address(Address(self.addr_a))
            .store_address(Address(self.addr_b))
            .end_cell()
        )
        b = Builder().store_uint(Status.OPEN, 8).store_uint(self.channel_id, 128)
        for _ in range(6):
            b.store_coins(0)
        return (
            b.store_uint(0, 64)
            .store_uint(0, 64)
            .store_ref(keys)
            .store_ref(params)
            .store_maybe_ref(None)
            .end_cell()
        )

    def state_init(self) -> StateInit:
        return StateInit(code=channel_code(), data=self.data_cell())

    def address(self) -> str:
        """The channel's raw address ``0:<hex>``."""
        return f"0:{self.state_init().serialize().hash.hex()}"

    def key_of(self, party: int) -> bytes:
        return self.key_a if party == PARTY_A else self.key_b


# --------------------------------------------------------------------------- bodies


def top_up_body(party: int, amount: int) -> Cell:
    return Builder().store_uint(Op.TOP_UP, 32).store_uint(party, 1).store_coins(amount).end_cell()


def signed_state_cell(channel_id: int, party: int, seqno: int, sent: int, signature: bytes) -> Cell:
    """``sig:bits512 ^StateBody``: a semi-state as the contract reads it."""
    body = _to_cell(_state_bits(channel_id, party, seqno, sent))
    return Builder().store_bytes(signature).store_ref(body).end_cell()


def _sig_cell(sig: bytes) -> Cell:
    return Builder().store_bytes(sig).end_cell()


def coop_commit_body(
    channel_id: int,
    seqno_a: int,
    seqno_b: int,
    sent_a: int,
    sent_b: int,
    withdraw_a: int,
    withdraw_b: int,
    sig_a: bytes,
    sig_b: bytes,
) -> Cell:
    payload = _to_cell(_commit_bits(channel_id, seqno_a, seqno_b, sent_a, sent_b, withdraw_a, withdraw_b))
    return (
        Builder()
        .store_uint(Op.COOP_COMMIT, 32)
        .store_ref(_sig_cell(sig_a))
        .store_ref(_sig_cell(sig_b))
        .store_ref(payload)
        .end_cell()
    )


def coop_close_body(
    channel_id: int, seqno_a: int, seqno_b: int, sent_a: int, sent_b: int, sig_a: bytes, sig_b: bytes
) -> Cell:
    payload = _to_cell(_close_bits(channel_id, seqno_a, seqno_b, sent_a, sent_b))
    return (
        Builder()
        .store_uint(Op.COOP_CLOSE, 32)
        .store_ref(_sig_cell(sig_a))
        .store_ref(_sig_cell(sig_b))
        .store_ref(payload)
        .end_cell()
    )


def _unilateral(
    op: int, tag: int, key: KeyPair, by_a: bool, channel_id: int, state_a: Cell | None, state_b: Cell | None
) -> Cell:
    payload = (
        Builder()
        .store_uint(tag, 32)
        .store_uint(channel_id, 128)
        .store_maybe_ref(state_a)
        .store_maybe_ref(state_b)
        .end_cell()
    )
    sig = key.sign(payload.hash)
    return (
        Builder()
        .store_uint(op, 32)
        .store_uint(1 if by_a else 0, 1)
        .store_bytes(sig)
        .store_ref(payload)
        .end_cell()
    )


def uncoop_body(
    key: KeyPair, by_a: bool, channel_id: int, state_a: Cell | None, state_b: Cell | None
) -> Cell:
    """Start an uncooperative close with the latest states the initiator holds (None: committed)."""
    return _unilateral(Op.START_UNCOOP, Tag.UNCOOP, key, by_a, channel_id, state_a, state_b)


def challenge_body(
    key: KeyPair, by_a: bool, channel_id: int, state_a: Cell | None, state_b: Cell | None
) -> Cell:
    """Challenge a quarantined close with newer states (None: keep the quarantined one)."""
    return _unilateral(Op.CHALLENGE, Tag.CHALLENGE, key, by_a, channel_id, state_a, state_b)


def finish_body() -> Cell:
    return Builder().store_uint(Op.FINISH, 32).end_cell()


# --------------------------------------------------------------------------- get-methods


@attrs.frozen
class Quarantine:
    seqno_a: int
    sent_a: int
    seqno_b: int
    sent_b: int
    started_at: int
    by_a: bool
    challenged: bool


@attrs.frozen
class ChannelData:
    """What ``get_channel_data`` (+ ``get_quarantine``) report about a deployed channel."""

    status: Status
    channel_id: int
    key_a: bytes
    key_b: bytes
    deposit_a: int
    deposit_b: int
    withdrawn_a: int
    withdrawn_b: int
    sent_a: int
    sent_b: int
    seqno_a: int
    seqno_b: int
    quarantine_duration: int
    fine: int
    quarantine: Quarantine | None = None

    def balance_a(self) -> int:
        return self.deposit_a - self.withdrawn_a - self.sent_a + self.sent_b

    def balance_b(self) -> int:
        return self.deposit_b - self.withdrawn_b - self.sent_b + self.sent_a


def _ints(stack: tuple[Any, ...] | list[Any], n: int) -> list[int]:
    if len(stack) != n or not all(isinstance(x, int) for x in stack):
        raise ValueError(f"expected {n} integers on the stack, got {stack!r}")
    return [int(x) for x in stack]


def parse_channel_data(stack: tuple[Any, ...] | list[Any]) -> ChannelData:
    v = _ints(stack, 14)
    return ChannelData(
        status=Status(v[0]),
        channel_id=v[1],
        key_a=v[2].to_bytes(32, "big"),
        key_b=v[3].to_bytes(32, "big"),
        deposit_a=v[4],
        deposit_b=v[5],
        withdrawn_a=v[6],
        withdrawn_b=v[7],
        sent_a=v[8],
        sent_b=v[9],
        seqno_a=v[10],
        seqno_b=v[11],
        quarantine_duration=v[12],
        fine=v[13],
    )


def parse_quarantine(stack: tuple[Any, ...] | list[Any]) -> Quarantine | None:
    v = _ints(stack, 8)
    if v[0] == 0:
        return None
    return Quarantine(
        seqno_a=v[1],
        sent_a=v[2],
        seqno_b=v[3],
        sent_b=v[4],
        started_at=v[5],
        by_a=v[6] != 0,
        challenged=v[7] != 0,
    )
