"""The payment channel state machine, a pure core (no I/O, no clock, no await).

Theory of operation. A channel joins A and B. Each party signs only its own *cumulative*
outgoing total ``sent`` with its own strictly increasing 64-bit ``seqno`` (a :class:`PayState`).
What a party may spend is ``deposit - withdrawn - own sent + peer sent``, using the on-chain
deposits and the latest peer state it accepted. A state is accepted only if its signature,
channel id and party are right, its seqno is above the latest one (an identical duplicate of the
latest is a no-op), its amount does not go down, and it does not spend more than its signer
holds: so the pair (own latest, peer latest) is always a pair the contract settles.

Every change is returned as effects, in order: :class:`Persist` (the shell writes it durably,
then calls :meth:`Channel.persisted`) comes before :class:`Send`. While a persist is pending the
channel is frozen: state changes raise :class:`LocalProtocolError`. If the write fails, the shell
drops the core and reloads the last persisted record; nothing unsent was ever seen by the peer,
so the reused seqno is safe.

Settling: :meth:`Channel.tick` applies a :class:`SettlementPolicy` (unsettled value above a
threshold, a timer, or a share of the deposit; a close after a long idle time) and returns
:class:`Settle`; the shell then runs :meth:`Channel.propose` -> peer
:meth:`Channel.receive_proposal` -> :meth:`Channel.receive_signature`, which yields a
:class:`Submit` with the message body both signatures make valid on chain. After a cooperative
close proposal is signed, no more payments are made.

A co-signer accepts a proposal that records *less* than it knows it sent (a payment may be in
flight while the peer proposes) or *more* than it knows it received: both only favour it. It
never signs away value it holds: the peer's part must be at least the latest peer state it has.
"""

from __future__ import annotations

import enum

import attrs
from pytoniq_core.boc.cell import Cell

from overlay import wire
from overlay.errors import (
    ChannelError,
    DecodeError,
    InsufficientFunds,
    LocalProtocolError,
    StaleState,
)

from . import contract as C
from .contract import PARTY_A, PARTY_B, ChannelData, ChannelParams
from .keys import KeyPair, verify
from .messages import ChannelRecord, CommitProposal, CommitSignature, PayState

__all__ = [
    "BadSignature",
    "Channel",
    "Effect",
    "Persist",
    "Phase",
    "Received",
    "Send",
    "Settle",
    "SettlementPolicy",
    "Submit",
    "WrongChannel",
]

MAX_SEQNO = 2**64 - 2
MAX_AMOUNT = 2**63 - 1


class BadSignature(ChannelError):
    """A state or payload whose signature does not verify."""


class WrongChannel(ChannelError):
    """A message for another channel, or claiming the wrong party."""


class Phase(enum.StrEnum):
    OPEN = "open"
    CLOSING = "closing"  # a cooperative close is signed: no more payments
    DISPUTE = "dispute"  # an uncooperative close is under way on chain
    CLOSED = "closed"


@attrs.frozen
class Persist:
    namespace: str
    key: str
    blob: bytes
    update_id: int


@attrs.frozen
class Send:
    msg: object


@attrs.frozen
class Received:
    """The peer paid us ``amount`` more (nanoTON)."""

    amount: int


@attrs.frozen
class Settle:
    kind: str  # "commit" | "close"
    reason: str


@attrs.frozen
class Submit:
    """A fully signed cooperative message body to send to the contract (external message)."""

    kind: str  # "commit" | "close"
    body: Cell = attrs.field(eq=False)


Effect = Persist | Send | Received | Settle | Submit


@attrs.frozen
class SettlementPolicy:
    # nanoTON unsettled before a commit: 0.6 TON, above 100 x a commit's measured fee (0.0053 TON),
    # so commits cost under 1 % of what they settle
    threshold: int = 600_000_000
    interval: float = 24 * 3600.0  # seconds between commits while value is unsettled
    deposit_share: float = 0.5  # commit when unsettled exceeds this share of the payer's deposit
    withdraw: bool = True  # a commit withdraws the receiver's earned balance
    close_idle: float = 7 * 24 * 3600.0  # seconds without a session before a cooperative close (0: never)


def _cid_bytes(channel_id: int) -> bytes:
    return channel_id.to_bytes(16, "big")


class Channel:
    """One side (``me``) of a channel."""

    def __init__(
        self,
        params: ChannelParams,
        me: int,
        key: KeyPair,
        *,
        policy: SettlementPolicy | None = None,
        record: ChannelRecord | None = None,
    ) -> None:
        if me not in (PARTY_A, PARTY_B):
            raise ValueError("me must be PARTY_A or PARTY_B")
        if key.public != params.key_of(me):
            raise ChannelError("our key is not this channel's key for our party")
        self.params = params
        self.me = me
        self.peer = 1 - me
        self.key = key
        self.policy = policy or SettlementPolicy()
        self.cid = _cid_bytes(params.channel_id)
        self._pending_update: int | None = None
        self._next_update = 1
        self._settle_requested = False
        if record is None:
            record = ChannelRecord(
                channel_id=self.cid, me=me, phase=Phase.OPEN.value, own_seqno=0, own_sent=0, own_sig=b"",
                peer_seqno=0, peer_sent=0, peer_sig=b"", deposit_a=0, deposit_b=0, withdrawn_a=0,
                withdrawn_b=0, committed_seqno_a=0, committed_seqno_b=0, committed_sent_a=0,
                committed_sent_b=0, last_settled_at=0.0,
            )  # fmt: skip
        elif record.channel_id != self.cid or record.me != me:
            raise ChannelError("the persisted record belongs to another channel or party")
        self.r = record

    # ---- views

    @property
    def key_name(self) -> str:
        return self.cid.hex()

    @property
    def phase(self) -> Phase:
        return Phase(self.r.phase)

    def _deposit(self, party: int) -> int:
        return self.r.deposit_a if party == PARTY_A else self.r.deposit_b

    def _withdrawn(self, party: int) -> int:
        return self.r.withdrawn_a if party == PARTY_A else self.r.withdrawn_b

    def _committed(self, party: int) -> tuple[int, int]:
        if party == PARTY_A:
            return self.r.committed_seqno_a, self.r.committed_sent_a
        return self.r.committed_seqno_b, self.r.committed_sent_b

    def available(self) -> int:
        """What we may still send: deposit - withdrawn - sent + received."""
        return self._deposit(self.me) - self._withdrawn(self.me) - self.r.own_sent + self.r.peer_sent

    def peer_available(self) -> int:
        return self._deposit(self.peer) - self._withdrawn(self.peer) - self.r.peer_sent + self.r.own_sent

    def unsettled(self) -> int:
        """Value received from the peer that the chain has not recorded yet."""
        return self.r.peer_sent - self._committed(self.peer)[1]

    def latest_peer_state(self) -> PayState | None:
        if not self.r.peer_sig:
            return None
        return PayState(self.cid, self.peer, self.r.peer_seqno, self.r.peer_sent, self.r.peer_sig)

    def latest_own_state(self) -> PayState | None:
        if not self.r.own_sig:
            return None
        return PayState(self.cid, self.me, self.r.own_seqno, self.r.own_sent, self.r.own_sig)

    def signed_state_cells(self) -> tuple[Cell | None, Cell | None]:
        """(A's, B's) latest signed states as contract cells (None: use the committed one)."""
        cells: list[Cell | None] = [None, None]
        for st in (self.latest_own_state(), self.latest_peer_state()):
            if st is None:
                continue
            if st.seqno > self._committed(st.party)[0]:
                cells[st.party] = C.signed_state_cell(
                    self.params.channel_id, st.party, st.seqno, st.sent, st.signature
                )
        return cells[0], cells[1]

    # ---- persistence discipline

    def _persist(self) -> Persist:
        if self._pending_update is not None:
            raise LocalProtocolError("a persist is pending: the channel is frozen")
        uid = self._next_update
        self._next_update += 1
        self._pending_update = uid
        return Persist("channel", self.key_name, wire.encode(self.r), uid)

    def persisted(self, update_id: int) -> None:
        """The shell confirms a Persist is durable."""
        if self._pending_update != update_id:
            raise LocalProtocolError(f"persisted({update_id}) but pending is {self._pending_update}")
        self._pending_update = None

    @property
    def frozen(self) -> bool:
        return self._pending_update is not None

    def _check_not_frozen(self) -> None:
        if self._pending_update is not None:
            raise LocalProtocolError("a persist is pending: the channel is frozen")

    @classmethod
    def restore(
        cls, params: ChannelParams, key: KeyPair, blob: bytes, *, policy: SettlementPolicy | None = None
    ) -> Channel:
        """Rebuild a channel from its last persisted record."""
        try:
            record = wire.decode_as(ChannelRecord, blob)
        except DecodeError as e:
            raise ChannelError(f"corrupt channel record: {e}") from e
        return cls(params, record.me, key, policy=policy, record=record)

    # ---- paying

    def pay(self, amount: int) -> list[Effect]:
        """Sign a new state sending ``amount`` more; effects: Persist, then Send(PayState)."""
        self._check_not_frozen()
        if self.phase is not Phase.OPEN:
            raise ChannelError(f"channel is {self.phase}: no more payments")
        if amount <= 0:
            raise ChannelError("payment amount must be positive")
        if amount > self.available():
            raise InsufficientFunds(f"paying {amount} with {self.available()} available")
        seqno = self.r.own_seqno + 1
        if seqno > MAX_SEQNO:
            raise ChannelError("seqno space exhausted: close the channel")
        sent = self.r.own_sent + amount
        sig = self.key.sign(C.state_hash(self.params.channel_id, self.me, seqno, sent))
        self.r = attrs.evolve(self.r, own_seqno=seqno, own_sent=sent, own_sig=sig)
        st = PayState(self.cid, self.me, seqno, sent, sig)
        return [self._persist(), Send(st)]

    def resend(self) -> list[Effect]:
        """Our latest state again (after a reconnect or a restart)."""
        st = self.latest_own_state()
        return [] if st is None else [Send(st)]

    def check_state(self, st: PayState) -> int:
        """Validate a peer state without changing anything; returns the increase it brings
        (0 for an exact duplicate of the latest). Raises a ChannelError subclass otherwise."""
        if st.channel_id != self.cid:
            raise WrongChannel("state for another channel")
        if st.party != self.peer:
            raise WrongChannel("state does not claim the peer's party")
        if not (0 <= st.seqno <= MAX_SEQNO and 0 <= st.sent <= MAX_AMOUNT):
            raise ChannelError("seqno or amount out of range")
        if st.seqno == self.r.peer_seqno and self.r.peer_sig:
            if st.sent == self.r.peer_sent and st.signature == self.r.peer_sig:
                return 0
            raise StaleState(f"a different state at seqno {st.seqno}")
        committed_seqno, committed_sent = self._committed(self.peer)
        if st.seqno <= self.r.peer_seqno or st.seqno <= committed_seqno:
            raise StaleState(f"seqno {st.seqno} is not above {max(self.r.peer_seqno, committed_seqno)}")
        if st.sent < self.r.peer_sent or st.sent < committed_sent:
            raise StaleState("cumulative amount went down")
        if not verify(
            self.params.key_of(self.peer),
            C.state_hash(self.params.channel_id, st.party, st.seqno, st.sent),
            st.signature,
        ):
            raise BadSignature("peer state signature does not verify")  # fmt: skip
        limit = self._deposit(self.peer) - self._withdrawn(self.peer) + self.r.own_sent
        if st.sent > limit:
            raise InsufficientFunds(f"peer state sends {st.sent}, more than its {limit}")
        return st.sent - self.r.peer_sent

    def check_old_state(self, st: PayState) -> None:
        """A state the peer signed before its latest one (it arrived late, on another stream):
        changes nothing; raises unless it is genuine and consistent with the latest."""
        if st.channel_id != self.cid or st.party != self.peer:
            raise WrongChannel("state for another channel or party")
        if not (0 <= st.seqno < self.r.peer_seqno and 0 <= st.sent <= self.r.peer_sent):
            raise StaleState("not an earlier state of the peer")
        h = C.state_hash(self.params.channel_id, st.party, st.seqno, st.sent)
        if not verify(self.params.key_of(self.peer), h, st.signature):
            raise BadSignature("peer state signature does not verify")

    def receive_state(self, st: PayState) -> list[Effect]:
        """Accept a peer state; effects: Persist, Received(delta). Duplicates of the latest: []."""
        self._check_not_frozen()
        if self.phase not in (Phase.OPEN, Phase.CLOSING):
            raise ChannelError(f"channel is {self.phase}")
        delta = self.check_state(st)
        if delta == 0 and st.seqno == self.r.peer_seqno:
            return []
        self.r = attrs.evolve(self.r, peer_seqno=st.seqno, peer_sent=st.sent, peer_sig=st.signature)
        return [self._persist(), Received(delta)]

    # ---- chain

    def sync_onchain(self, data: ChannelData, now: float) -> list[Effect]:
        """Adopt what the contract reports (deposits, withdrawals, committed states, status)."""
        self._check_not_frozen()
        if data.channel_id != self.params.channel_id:
            raise WrongChannel("chain data of another channel")
        r = self.r
        phase = r.phase
        if data.status is C.Status.CLOSED:
            phase = Phase.CLOSED.value
        elif data.status is C.Status.QUARANTINE:
            phase = Phase.DISPUTE.value
        committed_moved = (data.seqno_a, data.seqno_b) != (r.committed_seqno_a, r.committed_seqno_b)
        pending = r.pending
        if committed_moved:
            self._settle_requested = False
            pending = None
        new = attrs.evolve(
            r,
            phase=phase,
            deposit_a=data.deposit_a,
            deposit_b=data.deposit_b,
            withdrawn_a=data.withdrawn_a,
            withdrawn_b=data.withdrawn_b,
            committed_seqno_a=data.seqno_a,
            committed_seqno_b=data.seqno_b,
            committed_sent_a=data.sent_a,
            committed_sent_b=data.sent_b,
            last_settled_at=now
            if committed_moved or (r.last_settled_at == 0 and now > 0)
            else r.last_settled_at,
            last_activity=r.last_activity or now,
            pending=pending,
            cosigned=None if committed_moved else r.cosigned,
        )
        if new == r:
            return []
        self.r = new
        return [self._persist()]

    # ---- settlement

    def note_activity(self, now: float) -> None:
        """A session used the channel at ``now`` (kept in memory; persisted with the next update)."""
        if now > self.r.last_activity:
            self.r = attrs.evolve(self.r, last_activity=now)

    def tick(self, now: float) -> list[Effect]:
        """Apply the settlement policy; returns at most one Settle until the chain moves."""
        if self.phase is not Phase.OPEN or self._settle_requested:
            return []
        p = self.policy
        idle_since = self.r.last_activity
        if p.close_idle > 0 and idle_since > 0 and now - idle_since >= p.close_idle:
            self._settle_requested = True
            return [Settle("close", "idle")]
        unsettled = self.unsettled()
        if unsettled <= 0:
            return []
        reason = ""
        if unsettled >= p.threshold:
            reason = "threshold"
        elif unsettled >= p.deposit_share * max(1, self._deposit(self.peer)):
            reason = "deposit share"
        elif now - self.r.last_settled_at >= p.interval and self.r.last_settled_at > 0:
            reason = "timer"
        if not reason:
            return []
        self._settle_requested = True
        return [Settle("commit", reason)]

    def settle_failed(self) -> None:
        """The shell could not settle; the policy may ask again."""
        self._settle_requested = False

    def _states(self) -> tuple[int, int, int, int]:
        """(seqno_a, seqno_b, sent_a, sent_b) of the latest states we know."""
        own = (self.r.own_seqno, self.r.own_sent)
        peer = (self.r.peer_seqno, self.r.peer_sent)
        # A state we never signed/received sits at the committed values.
        own = max(own, self._committed(self.me))
        peer = max(peer, self._committed(self.peer))
        a, b = (own, peer) if self.me == PARTY_A else (peer, own)
        return a[0], b[0], a[1], b[1]

    def _payload_hash(self, p: CommitProposal) -> bytes:
        if p.close:
            return C.close_payload_hash(self.params.channel_id, p.seqno_a, p.seqno_b, p.sent_a, p.sent_b)
        return C.commit_payload_hash(
            self.params.channel_id, p.seqno_a, p.seqno_b, p.sent_a, p.sent_b, p.withdraw_a, p.withdraw_b
        )

    def _balances(self, sent_a: int, sent_b: int, wd_a: int, wd_b: int) -> tuple[int, int]:
        return self.r.deposit_a - wd_a - sent_a + sent_b, self.r.deposit_b - wd_b - sent_b + sent_a

    def has_news(self) -> bool:
        """Whether we hold states newer than the chain's committed ones (a commit would change it)."""
        sa, sb, _, _ = self._states()
        return (sa, sb) != (self.r.committed_seqno_a, self.r.committed_seqno_b)

    def propose(self, *, close: bool) -> list[Effect]:
        """Sign a cooperative commit (withdrawing our earned balance) or close of the latest states."""
        self._check_not_frozen()
        if self.phase is not Phase.OPEN:
            raise ChannelError(f"channel is {self.phase}")
        sa, sb, xa, xb = self._states()
        if not self.has_news():
            if not close:
                raise ChannelError("nothing new to commit")
            self._bump_own_seqno()  # the contract wants a newer seqno even to close an idle channel
            sa, sb, xa, xb = self._states()
        wd_a, wd_b = self.r.withdrawn_a, self.r.withdrawn_b
        if not close and self.policy.withdraw:
            bal_a, bal_b = self._balances(xa, xb, wd_a, wd_b)
            if self.me == PARTY_A:
                wd_a += bal_a
            else:
                wd_b += bal_b
        p = CommitProposal(self.cid, sa, sb, xa, xb, wd_a, wd_b, close, b"")
        p = attrs.evolve(p, signature=self.key.sign(self._payload_hash(p)))
        self.r = attrs.evolve(self.r, pending=p, phase=Phase.CLOSING.value if close else self.r.phase)
        return [self._persist(), Send(p)]

    def _bump_own_seqno(self) -> None:
        """Sign our current cumulative amount again at the next seqno (sends nothing more)."""
        own_seqno, own_sent = max((self.r.own_seqno, self.r.own_sent), self._committed(self.me))
        seqno = own_seqno + 1
        if seqno > MAX_SEQNO:
            raise ChannelError("seqno space exhausted")
        sig = self.key.sign(C.state_hash(self.params.channel_id, self.me, seqno, own_sent))
        self.r = attrs.evolve(self.r, own_seqno=seqno, own_sent=own_sent, own_sig=sig)

    def _proposal_fits(self, p: CommitProposal) -> bool:
        """Our part at most what we signed (and not below the chain), the peer's part at least
        what we hold of it: a proposal that fits only ever favours us."""
        sa, sb, xa, xb = self._states()
        mine = (p.seqno_a, p.sent_a) if self.me == PARTY_A else (p.seqno_b, p.sent_b)
        theirs = (p.seqno_b, p.sent_b) if self.me == PARTY_A else (p.seqno_a, p.sent_a)
        own_latest = (sa, xa) if self.me == PARTY_A else (sb, xb)
        peer_latest = (sb, xb) if self.me == PARTY_A else (sa, xa)
        own_committed = self._committed(self.me)
        peer_committed = self._committed(self.peer)
        for part, committed in ((mine, own_committed), (theirs, peer_committed)):
            if part[0] == committed[0] and part[1] != committed[1]:
                return False  # the contract would refuse a changed amount at a committed seqno
        return (
            own_committed[0] <= mine[0] <= own_latest[0]
            and own_committed[1] <= mine[1] <= own_latest[1]
            and theirs[0] >= peer_latest[0]
            and theirs[1] >= peer_latest[1]
            and max(theirs[0], mine[0]) <= MAX_SEQNO
            and max(theirs[1], mine[1]) <= MAX_AMOUNT
        )

    def check_proposal_signature(self, p: CommitProposal) -> None:
        """The proposer's signature (and channel) only: cheap to check before anything else."""
        if p.channel_id != self.cid:
            raise WrongChannel("proposal for another channel")
        if not verify(self.params.key_of(self.peer), self._payload_hash(p), p.signature):
            raise BadSignature("proposal signature does not verify")

    def receive_proposal(self, p: CommitProposal) -> list[Effect]:
        """Co-sign a proposal that fits our view (see the module docstring); anything else raises."""
        self._check_not_frozen()
        if p.channel_id != self.cid:
            raise WrongChannel("proposal for another channel")
        if self.phase is not Phase.OPEN:
            raise ChannelError(f"channel is {self.phase}")
        if not self._proposal_fits(p):
            raise StaleState("proposal does not carry states we can sign")
        if not close_ok(p, self):
            raise InsufficientFunds("proposal withdraws more than a balance")
        if not verify(self.params.key_of(self.peer), self._payload_hash(p), p.signature):
            raise BadSignature("proposal signature does not verify")
        mine = self.key.sign(self._payload_hash(p))
        self.r = attrs.evolve(self.r, cosigned=p, phase=Phase.CLOSING.value if p.close else self.r.phase)
        return [self._persist(), Send(CommitSignature(self.cid, p.close, mine))]

    def receive_signature(self, s: CommitSignature) -> list[Effect]:
        """The peer's signature over our pending proposal; yields Submit with the full body."""
        self._check_not_frozen()
        p = self.r.pending
        if p is None or s.channel_id != self.cid or s.close != p.close:
            raise ChannelError("no matching pending proposal")
        if not verify(self.params.key_of(self.peer), self._payload_hash(p), s.signature):
            raise BadSignature("co-signature does not verify")
        sig_a, sig_b = (p.signature, s.signature) if self.me == PARTY_A else (s.signature, p.signature)
        return [
            Submit(
                "close" if p.close else "commit", cooperative_body(self.params.channel_id, p, sig_a, sig_b)
            )
        ]

    def cosigned_close(self) -> Submit | None:
        """The close we co-signed, as a body we can submit ourselves if the proposer does not."""
        p = self.r.cosigned
        if p is None or not p.close:
            return None
        mine = self.key.sign(self._payload_hash(p))  # Ed25519 is deterministic: the same signature
        sig_a, sig_b = (mine, p.signature) if self.me == PARTY_A else (p.signature, mine)
        return Submit("close", cooperative_body(self.params.channel_id, p, sig_a, sig_b))


def close_ok(p: CommitProposal, ch: Channel) -> bool:
    """Withdrawals do not go down and leave both balances non-negative (a close carries none)."""
    if not p.close and (p.withdraw_a < ch.r.withdrawn_a or p.withdraw_b < ch.r.withdrawn_b):
        return False
    wd_a, wd_b = (ch.r.withdrawn_a, ch.r.withdrawn_b) if p.close else (p.withdraw_a, p.withdraw_b)
    bal_a, bal_b = ch._balances(p.sent_a, p.sent_b, wd_a, wd_b)
    return bal_a >= 0 and bal_b >= 0


def cooperative_body(channel_id: int, p: CommitProposal, sig_a: bytes, sig_b: bytes) -> Cell:
    if p.close:
        return C.coop_close_body(channel_id, p.seqno_a, p.seqno_b, p.sent_a, p.sent_b, sig_a, sig_b)
    return C.coop_commit_body(
        channel_id, p.seqno_a, p.seqno_b, p.sent_a, p.sent_b, p.withdraw_a, p.withdraw_b, sig_a, sig_b
    )
