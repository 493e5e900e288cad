"""Channel opening, the pure part: the agreed parameters, every lie caught, the payee's terms, the
on-chain checks, and the error codes of /cocoon/pay/1."""

from __future__ import annotations

import os

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import wire
from overlay.errors import (
    ChainError,
    DecodeError,
    InsufficientFunds,
    NodeError,
    RemoteError,
    RemoteProtocolError,
    StaleState,
)
from ton import contract as C
from ton.chain import AccountInfo
from ton.channel import BadSignature
from ton.keys import KeyPair
from ton.messages import ChannelCheck, ChannelChecked, ChannelMeta, OpenAccept, OpenChannel
from ton.metering import MeteringError
from ton.opening import (
    ChannelClosed,
    ChannelMismatch,
    ChannelOpenError,
    ChannelTerms,
    DuplicateSession,
    UnknownChannel,
    check_accept,
    check_chain_state,
    check_open,
    derive_channel_id,
    error_code,
    error_from_remote,
)
from ton.wallets import Wallet

TON = 10**9
KA, KB = KeyPair.from_seed(b"A" * 32), KeyPair.from_seed(b"B" * 32)
WA, WB = Wallet(KA), Wallet(KB)
TERMS = ChannelTerms()


def proposal() -> OpenChannel:
    return OpenChannel(b"\x01" * 32, KA.public, WA.address(), TON, 6 * 3600, TON)


def payee_side(sent: OpenChannel, nonce: bytes = b"\x02" * 32) -> tuple[OpenAccept, C.ChannelParams]:
    """What an honest payee answers, and the parameters it records."""
    addr_a = check_open(sent, TERMS, KB.public)
    cid = derive_channel_id(sent.nonce, nonce, sent.key, KB.public)
    params = C.ChannelParams(cid, sent.key, KB.public, addr_a, WB.address(), sent.quarantine, sent.fine)
    return OpenAccept(nonce, KB.public, WB.address(), cid.to_bytes(16, "big"), params.address()), params


def test_both_sides_agree_on_the_parameters_and_address() -> None:
    sent = proposal()
    acc, theirs = payee_side(sent)
    ours = check_accept(sent, acc)
    assert ours == theirs
    assert ours.address() == acc.channel_address
    assert 0 < ours.channel_id < 2**128


@given(
    field=st.sampled_from(["nonce", "key", "address", "channel_id", "channel_address"]),
    blob=st.binary(min_size=0, max_size=40),
)
def test_any_change_to_the_payees_answer_is_caught(field: str, blob: bytes) -> None:
    sent = proposal()
    acc, _ = payee_side(sent)
    if field in ("address", "channel_address"):
        lie = attrs.evolve(acc, **{field: "0:" + blob.hex().ljust(64, "0")[:64]})
    else:
        lie = attrs.evolve(acc, **{field: blob})
    if lie == acc:
        return
    with pytest.raises(ChannelOpenError):
        check_accept(sent, lie)


def test_an_echoed_key_or_nonce_is_caught_even_when_consistent() -> None:
    sent = proposal()
    for nonce, key in ((b"\x02" * 32, KA.public), (sent.nonce, KB.public)):
        cid = derive_channel_id(sent.nonce, nonce, sent.key, key)
        params = C.ChannelParams(cid, KA.public, key, WA.address(), WB.address(), sent.quarantine, sent.fine)
        acc = OpenAccept(nonce, key, WB.address(), cid.to_bytes(16, "big"), params.address())
        with pytest.raises(ChannelOpenError):
            check_accept(sent, acc)


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=4, max_size=4, unique=True))
def test_channel_ids_depend_on_every_half(parts: list[bytes]) -> None:
    a, b, ka, kb = parts
    cid = derive_channel_id(a, b, ka, kb)
    assert cid < 2**128
    assert cid != derive_channel_id(b, a, ka, kb)
    assert cid != derive_channel_id(a, b, kb, ka)
    assert cid != derive_channel_id(os.urandom(32), b, ka, kb)


@pytest.mark.parametrize(
    "change",
    [
        {"quarantine": 60},
        {"quarantine": 30 * 24 * 3600},
        {"fine": 1},
        {"fine": 10**6 * TON},
        {"deposit": 1},
        {"deposit": 2**80},
        {"address": "garbage"},
        {"address": "-1:" + "aa" * 32},
        {"key": KB.public},
        {"key": b"short"},
        {"nonce": b""},
    ],
)
def test_the_payee_refuses_terms_it_does_not_accept(change: dict[str, object]) -> None:
    with pytest.raises(ChannelOpenError):
        check_open(attrs.evolve(proposal(), **change), TERMS, KB.public)


def chain_view(params: C.ChannelParams) -> tuple[AccountInfo, C.ChannelData]:
    data = C.ChannelData(
        C.Status.OPEN, params.channel_id, params.key_a, params.key_b, TON, 0, 0, 0, 0, 0, 0, 0,
        params.quarantine, params.fine,
    )  # fmt: skip
    return AccountInfo(params.address(), "active", TON + 10_000_000, 5, C.channel_code().hash), data


@pytest.mark.parametrize(
    ("where", "change", "error"),
    [
        ("account", {"status": "uninit"}, ChannelMismatch),
        ("account", {"code_hash": b"\x00" * 32}, ChannelMismatch),
        ("account", {"balance": TON // 2}, ChannelMismatch),
        ("data", {"channel_id": 7}, ChannelMismatch),
        ("data", {"key_b": KA.public}, ChannelMismatch),
        ("data", {"quarantine_duration": 60}, ChannelMismatch),
        ("data", {"fine": 1}, ChannelMismatch),
        ("data", {"deposit_a": TON // 2}, ChannelMismatch),
        ("data", {"status": C.Status.CLOSED}, ChannelClosed),
    ],
)
def test_the_chain_must_show_the_agreed_funded_solvent_channel(
    where: str, change: dict[str, object], error: type
) -> None:
    _, params = payee_side(proposal())
    account, data = chain_view(params)
    assert check_chain_state(params, account, data, min_deposit_a=TON, fresh=True) == data
    if where == "account":
        account = attrs.evolve(account, **change)  # type: ignore[arg-type]
    else:
        data = attrs.evolve(data, **change)  # type: ignore[arg-type]
    with pytest.raises(error):
        check_chain_state(params, account, data, min_deposit_a=TON, fresh=True)
    with pytest.raises(ChannelMismatch):
        check_chain_state(params, account, None)


@pytest.mark.parametrize(
    "cls",
    [UnknownChannel, ChannelMismatch, ChannelOpenError, ChannelClosed, DuplicateSession, BadSignature,
     StaleState, InsufficientFunds, MeteringError, ChainError],
)  # fmt: skip
def test_error_frames_come_back_as_the_same_typed_errors(cls: type[NodeError]) -> None:
    code = error_code(cls("why"))
    back = error_from_remote(RemoteError(code, "why"))
    assert type(back) is cls
    assert "why" in str(back)


def test_unknown_or_protocol_codes_stay_remote_errors() -> None:
    for code in ("protocol", "no-such-code"):
        e = RemoteError(code, "x")
        assert error_from_remote(e) is e
    assert error_code(RemoteProtocolError("x")) == "protocol"


def test_after_settlements_the_contract_must_still_hold_the_payees_balance() -> None:
    """Settlement gas comes out of the contract's balance (A's remainder at the close)."""
    _, params = payee_side(proposal())
    account, data = chain_view(params)
    data = attrs.evolve(data, sent_a=TON // 2, seqno_a=3)
    short_of_a = attrs.evolve(account, balance=TON - 20_000_000)  # gas ate into A's part
    assert check_chain_state(params, short_of_a, data) == data
    with pytest.raises(ChannelMismatch):
        check_chain_state(params, short_of_a, data, fresh=True)
    with pytest.raises(ChannelMismatch):
        check_chain_state(params, attrs.evolve(account, balance=TON // 2 - 1), data)


_OPENING_MESSAGES = [OpenChannel, OpenAccept, ChannelCheck, ChannelChecked, ChannelMeta]


@given(
    cls=st.sampled_from(_OPENING_MESSAGES),
    fields=st.lists(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1), st.binary(max_size=100), st.text(max_size=100), st.none()
        ),
        max_size=14,
    ),
)
def test_forged_open_messages_decode_or_raise_decode_error(cls: type, fields: list[object]) -> None:
    raw = msgpack.packb([wire.WIRE_VERSION, cls.TAG, fields], use_bin_type=True)  # type: ignore[attr-defined]
    try:
        msg = wire.decode(raw)
    except DecodeError:
        return
    assert isinstance(msg, cls)
    assert wire.decode(wire.encode(msg)) == msg


@given(st.binary(max_size=400))
def test_random_bytes_on_the_control_stream_raise_decode_error_only(data: bytes) -> None:
    try:
        wire.decode(data)
    except DecodeError:
        pass


def test_open_messages_round_trip() -> None:
    sent = proposal()
    acc, params = payee_side(sent)
    meta = ChannelMeta(
        acc.channel_id, 1, "12D3KooW", params.key_a, params.key_b, params.addr_a, params.addr_b,
        params.quarantine, params.fine, "proposed", 1.5, TON,
    )  # fmt: skip
    for m in (
        sent,
        acc,
        ChannelCheck(acc.channel_id),
        ChannelChecked(acc.channel_id, "open", 1, 2, 3, 4),
        meta,
    ):
        assert wire.decode(wire.encode(m)) == m
