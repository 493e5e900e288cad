"""Opening a channel over the wire, the pure part: terms, the channel id, and every check.

The open conversation on ``/cocoon/pay/1`` (payer P = party A, payee Q = party B)::

    P -> Q  OpenChannel(nonce_P, key_P, addr_P, deposit, quarantine, fine)
    Q       check_open: well-formed key and address; deposit, quarantine and fine within Q's terms
    Q       draws nonce_Q; channel_id = derive_channel_id(nonce_P, nonce_Q, key_P, key_Q);
            persists the proposal
    Q -> P  OpenAccept(nonce_Q, key_Q, addr_Q, channel_id, channel_address)
    P       check_accept: the id and the address follow from both halves (else the payee lied)
    P       the address must be unused on chain; deploys the contract with the deposit
    P -> Q  ChannelCheck(channel_id)
    Q       check_chain_state: our code, our params, status open, the deposit, the balance
    Q -> P  ChannelChecked(...)          (or an ErrorFrame: nothing is accepted on that channel)

Both nonces are fresh random 32 bytes and the id hashes both, so neither side alone can steer
the id onto a channel used before; the payer also refuses an address that already exists.
Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib

import attrs

from overlay.errors import (
    ChainError,
    ChannelError,
    InsufficientFunds,
    NodeError,
    RemoteError,
    RemoteProtocolError,
    StaleState,
)

from . import contract as C
from .chain import AccountInfo, normalize_address
from .channel import BadSignature, WrongChannel
from .messages import OpenAccept, OpenChannel
from .metering import MeteringError

__all__ = [
    "PROTOCOL",
    "ChannelClosed",
    "ChannelMismatch",
    "ChannelOpenError",
    "ChannelTerms",
    "DuplicateSession",
    "UnknownChannel",
    "check_accept",
    "check_chain_state",
    "check_open",
    "derive_channel_id",
    "error_code",
    "error_from_remote",
]

PROTOCOL = "/cocoon/pay/1"  # the stream protocol of opens, checks, settlements and sessions
TON = 10**9
MAX_DEPOSIT = 10**9 * TON  # nanoTON: far above any real deposit, far below the Coins limit


class ChannelOpenError(ChannelError):
    """An open failed: the counterparty refused it, or lied about the channel's parameters."""


class ChannelMismatch(ChannelOpenError):
    """The channel on chain is not the one agreed (code, parameters, status, deposit or balance)."""


class UnknownChannel(WrongChannel):
    """A message names a channel we do not have with this peer."""


class ChannelClosed(ChannelError):
    """The channel is closing or closed: it takes no new sessions or payments."""


class DuplicateSession(ChannelError):
    """A session id that was already used (a replayed SessionOpen)."""


@attrs.frozen
class ChannelTerms:
    """What we ask for as a payer and accept as a payee.  Units in the comments."""

    deposit: int = 2 * TON  # nanoTON we deposit when we open a channel as the payer
    top_up_below: float = 0.25  # top up when what we may spend falls below this share of `deposit`
    quarantine: int = 6 * 3600  # seconds, proposed as the payer
    fine: int = 1 * TON  # nanoTON, proposed as the payer
    min_deposit: int = 10_000_000  # nanoTON a payer must deposit for us (as the payee) to accept
    min_quarantine: int = 3600  # seconds, accepted range as the payee
    max_quarantine: int = 48 * 3600
    min_fine: int = 100_000_000  # nanoTON, accepted range as the payee
    max_fine: int = 100 * TON


def derive_channel_id(nonce_a: bytes, nonce_b: bytes, key_a: bytes, key_b: bytes) -> int:
    """The channel id both sides compute: 128 bits of a hash over both halves."""
    h = hashlib.sha256(b"cocoon-channel-id-v1" + nonce_a + nonce_b + key_a + key_b).digest()
    return int.from_bytes(h[:16], "big")


def _basechain(address: str, who: str) -> str:
    try:
        raw = normalize_address(address)
    except ChainError as e:
        raise ChannelOpenError(f"{who} payout address is not a TON address") from e
    if not raw.startswith("0:"):
        raise ChannelOpenError(f"{who} payout address is not in the basechain")
    return raw


def check_open(msg: OpenChannel, terms: ChannelTerms, our_key: bytes) -> str:
    """The payee's check of an OpenChannel; returns the payer's raw payout address."""
    if len(msg.nonce) != 32 or len(msg.key) != 32:
        raise ChannelOpenError("nonce and key must be 32 bytes")
    if msg.key == our_key:
        raise ChannelOpenError("a channel needs two different keys")
    addr = _basechain(msg.address, "the payer's")
    if not terms.min_deposit <= msg.deposit <= MAX_DEPOSIT:
        raise ChannelOpenError(f"deposit {msg.deposit} is below our minimum of {terms.min_deposit}")
    if not terms.min_quarantine <= msg.quarantine <= terms.max_quarantine:
        raise ChannelOpenError(
            f"quarantine {msg.quarantine} s is outside {terms.min_quarantine}..{terms.max_quarantine} s"
        )
    if not terms.min_fine <= msg.fine <= terms.max_fine:
        raise ChannelOpenError(f"fine {msg.fine} is outside {terms.min_fine}..{terms.max_fine}")
    return addr


def check_accept(sent: OpenChannel, acc: OpenAccept) -> C.ChannelParams:
    """The payer's check of the payee's answer; returns the agreed parameters."""
    if len(acc.nonce) != 32 or len(acc.key) != 32 or len(acc.channel_id) != 16:
        raise ChannelOpenError("the payee's nonce, key or channel id has the wrong length")
    if acc.key == sent.key or acc.nonce == sent.nonce:
        raise ChannelOpenError("the payee echoed our own key or nonce")
    addr_b = _basechain(acc.address, "the payee's")
    cid = derive_channel_id(sent.nonce, acc.nonce, sent.key, acc.key)
    if acc.channel_id != cid.to_bytes(16, "big"):
        raise ChannelOpenError("the payee's channel id does not follow from both nonces")
    params = C.ChannelParams(
        channel_id=cid,
        key_a=sent.key,
        key_b=acc.key,
        addr_a=normalize_address(sent.address),
        addr_b=addr_b,
        quarantine=sent.quarantine,
        fine=sent.fine,
    )
    if acc.channel_address != params.address():
        raise ChannelOpenError("the payee's channel address does not follow from the parameters")
    return params


def check_chain_state(
    params: C.ChannelParams,
    account: AccountInfo,
    data: C.ChannelData | None,
    *,
    min_deposit_a: int = 0,
    fresh: bool = False,
) -> C.ChannelData:
    """The channel on chain is ours, as agreed, open, funded and solvent; returns its data.

    Solvent: a ``fresh`` channel (just deployed) holds everything it owes both parties. Later the
    gas of cooperative settlements (external messages) is paid from the contract's balance, which
    the close takes out of what A receives (B is paid its exact balance first, A the remainder):
    so the contract must always hold at least B's balance."""
    if account.status != "active" or data is None:
        raise ChannelMismatch(f"no deployed contract at {params.address()} (status {account.status})")
    if account.code_hash != C.channel_code().hash:
        raise ChannelMismatch("the contract at the channel address is not our channel code")
    agreed = (params.channel_id, params.key_a, params.key_b, params.quarantine, params.fine)
    seen = (data.channel_id, data.key_a, data.key_b, data.quarantine_duration, data.fine)
    if seen != agreed:
        raise ChannelMismatch("the contract's parameters are not the agreed ones")
    if data.status is not C.Status.OPEN:
        raise ChannelClosed(f"the channel is {data.status.name.lower()} on chain")
    if data.deposit_a < min_deposit_a:
        raise ChannelMismatch(f"deposit on chain is {data.deposit_a}, {min_deposit_a} was announced")
    owed = data.balance_a() + data.balance_b() if fresh else data.balance_b()
    if account.balance < owed:
        raise ChannelMismatch(f"the contract holds {account.balance}, less than the {owed} it owes")
    return data


# Error frames on /cocoon/pay/1: the code names the kind, so the requester raises a typed error.
_CODES: tuple[tuple[type[NodeError], str], ...] = (
    (UnknownChannel, "unknown_channel"),
    (ChannelMismatch, "mismatch"),
    (ChannelOpenError, "refused"),
    (ChannelClosed, "closed"),
    (DuplicateSession, "duplicate_session"),
    (BadSignature, "bad_signature"),
    (StaleState, "stale"),
    (InsufficientFunds, "insufficient"),
    (MeteringError, "metering"),
    (ChannelError, "channel"),
    (ChainError, "chain"),
    (RemoteProtocolError, "protocol"),
)


def error_code(e: NodeError) -> str:
    """The error frame code for one of our errors."""
    for cls, code in _CODES:
        if isinstance(e, cls):
            return code
    return "error"


def error_from_remote(e: RemoteError) -> NodeError:
    """The typed error a peer's error frame stands for (message prefixed with who said it)."""
    for cls, code in _CODES:
        if code == e.code:
            if cls is RemoteProtocolError:
                break
            return cls(f"peer: {e.message}")
    return e
