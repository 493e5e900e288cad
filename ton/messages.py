"""Wire messages of the ton package (tags 400-499).

400-403  channel: signed states, cooperative commit/close negotiation, the persisted record
404-419  channel opening and the control protocol ``/cocoon/pay/1`` (see ``ton.manager``),
         and the per-channel metadata the payment manager persists
420-439  metering: session open/accept, worker receipts, payments bound to a session, close
450-479  local chain RPC (requests and replies, see ``ton.rpc``)

Channel ids travel as 16 bytes (they are uint128); amounts are nanoTON ints (< 2**63 here, far
above any deposit); signatures are 64 bytes over the contract's cell hashes (``ton.contract``).
"""

from __future__ import annotations

import attrs

from overlay import wire

__all__ = [
    "ChannelCheck",
    "ChannelChecked",
    "ChannelMeta",
    "ChannelRecord",
    "CommitProposal",
    "CommitSignature",
    "OpenAccept",
    "OpenChannel",
    "PayState",
    "Receipt",
    "SessionAccept",
    "SessionClose",
    "SessionOpen",
    "SessionPayment",
]


@wire.message(400)
@attrs.frozen
class PayState:
    """A party's cumulative outgoing state: ``sent`` nanoTON in total, at ``seqno``, signed."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    party: int  # 0 = A, 1 = B: whose state this is
    seqno: int
    sent: int
    signature: bytes = attrs.field(metadata=wire.limits(max_len=64))


@wire.message(401)
@attrs.frozen
class CommitProposal:
    """A cooperative commit (``close`` False) or close proposal, signed by the proposer."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    seqno_a: int
    seqno_b: int
    sent_a: int
    sent_b: int
    withdraw_a: int  # cumulative withdrawals after the commit (ignored for a close)
    withdraw_b: int
    close: bool
    signature: bytes = attrs.field(metadata=wire.limits(max_len=64))


@wire.message(402)
@attrs.frozen
class CommitSignature:
    """The counterparty's signature over the proposal's payload."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    close: bool
    signature: bytes = attrs.field(metadata=wire.limits(max_len=64))


@wire.message(403)
@attrs.frozen
class ChannelRecord:
    """Everything one side must keep about a channel (persisted before any message is sent)."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    me: int
    phase: str = attrs.field(metadata=wire.limits(max_len=16))
    own_seqno: int
    own_sent: int
    own_sig: bytes = attrs.field(metadata=wire.limits(max_len=64))
    peer_seqno: int
    peer_sent: int
    peer_sig: bytes = attrs.field(metadata=wire.limits(max_len=64))
    deposit_a: int
    deposit_b: int
    withdrawn_a: int
    withdrawn_b: int
    committed_seqno_a: int
    committed_seqno_b: int
    committed_sent_a: int
    committed_sent_b: int
    last_settled_at: float
    pending: CommitProposal | None = None
    cosigned: CommitProposal | None = None
    last_activity: float = 0.0  # when a session last used the channel (idle close)


@wire.message(404)
@attrs.frozen
class OpenChannel:
    """Payer -> payee, first message of an open: the payer's half of the channel parameters."""

    nonce: bytes = attrs.field(metadata=wire.limits(max_len=32))  # fresh random: half of the channel id
    key: bytes = attrs.field(metadata=wire.limits(max_len=32))  # the payer's Ed25519 channel key
    address: str = attrs.field(metadata=wire.limits(max_len=80))  # the payer's payout address (its wallet)
    deposit: int  # nanoTON the payer will deposit
    quarantine: int  # seconds
    fine: int  # nanoTON


@wire.message(405)
@attrs.frozen
class OpenAccept:
    """Payee -> payer: the payee's half; both sides derive the channel id and address."""

    nonce: bytes = attrs.field(metadata=wire.limits(max_len=32))
    key: bytes = attrs.field(metadata=wire.limits(max_len=32))
    address: str = attrs.field(metadata=wire.limits(max_len=80))
    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))  # derived from both nonces and keys
    channel_address: str = attrs.field(metadata=wire.limits(max_len=80))  # the contract's address, "0:<hex>"


@wire.message(406)
@attrs.frozen
class ChannelCheck:
    """Asks the counterparty to read this channel on chain now (after a deploy, top-up, settlement)."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))


@wire.message(407)
@attrs.frozen
class ChannelChecked:
    """The counterparty verified the channel on chain and adopted what it saw."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    status: str = attrs.field(metadata=wire.limits(max_len=16))  # "open" | "closed" | ...
    deposit_a: int
    deposit_b: int
    seqno_a: int  # committed seqnos the counterparty now knows
    seqno_b: int


@wire.message(408)
@attrs.frozen
class ChannelMeta:
    """What the payment manager persists beside each channel's record."""

    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    me: int  # our party: 0 = A (payer), 1 = B (payee)
    peer_id: str = attrs.field(metadata=wire.limits(max_len=128))
    key_a: bytes = attrs.field(metadata=wire.limits(max_len=32))
    key_b: bytes = attrs.field(metadata=wire.limits(max_len=32))
    addr_a: str = attrs.field(metadata=wire.limits(max_len=80))
    addr_b: str = attrs.field(metadata=wire.limits(max_len=80))
    quarantine: int
    fine: int
    status: str = attrs.field(
        metadata=wire.limits(max_len=16)
    )  # proposed | deploying | open | closing | closed | failed
    created_at: float
    deposit: int  # the deposit the payer announced


@wire.message(420)
@attrs.frozen
class SessionOpen:
    """The payer opens a metered session bound to an offer's prices."""

    session_id: bytes = attrs.field(metadata=wire.limits(max_len=32))
    offer_id: bytes = attrs.field(metadata=wire.limits(max_len=64))
    channel_id: bytes = attrs.field(metadata=wire.limits(max_len=16))
    price_prompt: int  # nanoTON per prompt token
    price_completion: int  # nanoTON per completion token
    prompt_tokens: int
    max_tokens: int


@wire.message(421)
@attrs.frozen
class SessionAccept:
    session_id: bytes = attrs.field(metadata=wire.limits(max_len=32))
    receipt_every: int  # the worker signs a receipt every this many completion tokens
    credit_window: int  # unpaid completion tokens the worker streams before pausing


@wire.message(422)
@attrs.frozen
class Receipt:
    """The worker's signed count of completion tokens delivered so far in a session."""

    session_id: bytes = attrs.field(metadata=wire.limits(max_len=32))
    tokens: int  # cumulative completion tokens delivered
    token_hash: bytes = attrs.field(
        metadata=wire.limits(max_len=32)
    )  # hash chain over the delivered token ids
    final: bool
    signature: bytes = attrs.field(metadata=wire.limits(max_len=64))


@wire.message(423)
@attrs.frozen
class SessionPayment:
    """A payment for a session: the payer pays for ``tokens`` completion tokens (cumulative)."""

    session_id: bytes = attrs.field(metadata=wire.limits(max_len=32))
    tokens: int  # completion tokens paid for, cumulative in the session
    amount: int  # nanoTON paid for this session so far (prompt + completion)
    state: PayState


@wire.message(424)
@attrs.frozen
class SessionClose:
    session_id: bytes = attrs.field(metadata=wire.limits(max_len=32))
    reason: str = attrs.field(metadata=wire.limits(max_len=64))
